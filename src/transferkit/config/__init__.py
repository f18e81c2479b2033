"""Configuration: compose conf/ with Hydra, write and check params.yaml, validate values."""
