-- A lock that names no agent hands its LOCK (and, lifted, its UNLOCK) commands out to the fleet
-- in short steps, one write transaction per batch of agents (docs/workflow.md, "Locks"):
-- `handout_after` is where the next step goes on (the name of the last agent handled; '' before
-- the first), NULL once every agent has its command. A coordinator stopped half-way finishes it
-- when it starts again (any replica, on PostgreSQL).
-- depends: 0007.breakglass 0007.identity-generation

ALTER TABLE locks ADD COLUMN handout_after TEXT;
