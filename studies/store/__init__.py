"""The store: the database every other part of the lab reads and writes.

`db` (our tables beside Optuna's, sessions, migrations, retries), `sqlite_file` (a store's file
checked without the ORM, for the fast read path), `clock` (UTC as the store keeps it), `states`
(the states a study, run and cell can be in) and `forgetsets` (named, content-hashed forget sets).
Kept light on purpose: importing this package imports no ORM."""
