"""crs-rlhf's entry points: the `crs-rlhf` CLI and the jobs that wire every package together
(demo, sweep, serve, plots, the locally built tiny models, local service processes).

This is the only package that imports all the others (crs_rlhf -> evaluation -> trainer ->
services.common); nothing imports it back.
"""
