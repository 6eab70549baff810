"""The composition root: the apps the `cbir` commands serve (`apps`), `cbir serve`'s one machine
(`one_machine`), `cbir index` (`indexing`) and the model rollover (`rollover`).

The apps (`services.search.app`, `services.embedder.app`) take their parts as factories from here, and import
neither this package nor `services.wiring`.
"""
