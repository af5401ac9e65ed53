"""Running a study: the worker pool that claims runs, the launch of a detached pool, one run
attempt per subprocess (`worker`), writing its cells (`recorder`), best-cell attacks, the devices and logs
runs use, and the checks that need transformers run in a child process (`probe`)."""
