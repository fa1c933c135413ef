"""The configuration: its schema (frozen dataclasses, `schema`), how it is read (`reading`: TOML, DARTS' `[darts]`
table, named recipes, `--set`) and written (`dump`), DARTS' configuration files (`darts`) and the named recipes
(`recipes`, `recipes.toml`). Imports nothing heavier than the standard library."""

from smptrain.config.dump import dotted_keys, dump_toml, plain, to_dict
from smptrain.config.reading import Loaded, from_dict, load_config, read_config
from smptrain.config.schema import Config, DataConfig, LogConfig, ModelConfig, TrainConfig, replace

__all__ = ["Config", "DataConfig", "LogConfig", "Loaded", "ModelConfig", "TrainConfig", "dotted_keys", "dump_toml",
           "from_dict", "load_config", "plain", "read_config", "replace", "to_dict"]
