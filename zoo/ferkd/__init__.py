"""FerKD: Surgical Label Adaptation for Efficient Distillation (Shen, ICCV 2023; official code ``szq0214/FKD``,
``FerKD/`` on the FKD trainer)."""
