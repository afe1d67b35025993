-- Lock commands handed out in steps (as server/store/migrations/0008.lock-handout.sql):
-- `handout_after` is the name of the last agent handled ('' before the first), NULL when done.

ALTER TABLE locks ADD COLUMN handout_after TEXT;
