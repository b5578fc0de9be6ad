"""Tools that run beside training, never inside a training step: the overhead benchmark
(:mod:`stepguard.tools.bench`, ``stepguard bench``) and its workloads
(:mod:`stepguard.tools.bench_models`). Nothing the guard imports lives here.
"""
