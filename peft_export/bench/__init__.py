"""The one benchmark harness: `peft-export bench` and every script in benchmarks/ measure with these modules.

machine       the CPU (model, flags), cores, library versions, load
stats         percentiles, medians, cosines between embedding rows
timing        batch-1 latency and throughput timers with warm-up
rounds        contenders measured in alternating rounds
child         a contender in its own child process: wall time and peak memory (one way of measuring it)
server        `peft-export serve` as a subprocess: start, wait until ready, stop
http_load     the HTTP load generator of the serving benchmarks, every response checked
builders      the exports and adapters a benchmark measures, built once per work folder
texts         real text: demo queries and sentences, distinct corpus texts, corpus files
report        the report writer: JSON + Markdown table + machine
suite, run    the contender x workload suite behind `peft-export bench`, and its command
tiny_models, family_models   tiny offline encoders and decoder-family models (shared with the tests)
"""
