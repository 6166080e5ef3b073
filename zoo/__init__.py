"""The zoo, in three layers: ``zoo.core`` (plumbing: base module, teachers, the data-stream contract, distributed
helpers, views, metrics, media, CLI) imports nothing else of the zoo; a family folder (``LAYER = "family"`` in its
``__init__``: ``zoo.semisup``, ``zoo.segda``, ``zoo.lm``) holds what two or more papers share and imports only core;
every other folder is one paper, importing core and at most one family. ``zoo.tools`` holds the command lines."""
