"""SDXS training stages (see train/README.md): shared base in train.common, one script per stage."""
