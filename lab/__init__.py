"""The lab: what makes and judges models (trainers, eval, metrics, benchmarks). Never imported by studio/."""
