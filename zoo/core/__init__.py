"""The thin common base: plumbing every paper shares, and no paper's idea."""
