"""Benchmark harness and suite behind `peft-export bench` and the scripts in benchmarks/."""
