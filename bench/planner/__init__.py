"""The planner's benchmark: a scenario suite against two baselines, then a real run.

`python -m bench planner` (see `run`). Shapes of real models in `shapes`, the
baselines in `baselines`, pools in `scenarios`, the latency proxy in
`delay_proxy`, the measurement on llama.cpp in `real`, the figures of the
search's fallback when out of budget in `floor`.
"""
