"""The stage modules: one per stage, thin, never importing one another. Importing this package (as importing any of
its modules does) imports every module in it, found by name as a plug-in would be, so that each registers its
functions for the stages the library declares (pipeline/orchestration/stage.py `implement`): a new stage module
needs no line here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
