"""Stages of a round, each one module with one `run(cfg, inputs, out_dir, round_n) -> StageResult`."""
