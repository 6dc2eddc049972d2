"""The engines: the serial reference and the Dask engine.

- :mod:`.reference`: the serial oracle, the splitting's steps block by block (no Dask);
- :mod:`.driver`: the one driver of the Dask engine, for both state backends (start, windows of
  iterations submitted ahead, statistics in order, stop, checkpoints, resume);
- :mod:`.executors`: where its tasks run (Dask's synchronous or threaded scheduler, or futures
  on a distributed cluster) and the lost-worker recovery;
- :mod:`.cluster`: starting, connecting to and sharing a cluster.

Only this package (and :mod:`daskadmm.lazy`, the out-of-core input) imports dask and
distributed; nothing here is imported until it is used.
"""
