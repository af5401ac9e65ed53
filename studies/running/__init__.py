"""Running a study: the worker pool's loop (`pool`), claiming a run or a job once (`claim`), TPE's
ask (`tpe`), settling a run whose process is gone (`settle`), every command line the lab starts
(`processes`), the launch of a detached pool, one run attempt per subprocess (`worker`), writing its
cells (`recorder`), best-cell attacks, the devices and logs runs use, and the checks that need
transformers run in a child process (`probe`)."""
