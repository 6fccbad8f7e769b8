"""The stage modules: one per stage, thin, never importing one another. Importing this package (as importing any of
its modules does) imports them all, so each registers its functions for the stages the library declares
(pipeline/orchestration/stage.py `implement`)."""

from stages import evaluate, features, features_hcl, prepare, train  # noqa: F401  (each implements its stages)
