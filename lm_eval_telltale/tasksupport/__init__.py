"""Support code of the packaged lm-eval tasks (``tasks/``): answer extraction and scoring
(:mod:`.scoring`), dataset loading with the offline local-data override and the fixture writer
(:mod:`.taskdata`), and a small local task for tests and demos (:mod:`.localtask`)."""
