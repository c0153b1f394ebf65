"""Experiments: one module per job or paper section, each `run(config, reporter) -> results`."""
