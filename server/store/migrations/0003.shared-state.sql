-- Signed audit checkpoints live in the database (they were a file beside it), so every replica
-- sees and extends the same list, in the order they were written.
-- depends: 0002.enrollment-and-certificates 0002.locks

CREATE TABLE checkpoints (
    id        INTEGER PRIMARY KEY,
    seq       INTEGER NOT NULL,
    hash      TEXT NOT NULL,
    at        INTEGER NOT NULL,
    key_id    TEXT NOT NULL,
    signature BLOB NOT NULL
);
