-- Command-log retention (issue 12): the log of each agent is truncated behind its acknowledged
-- position. `log_start` is the seq at or below which its commands may be gone: an agent
-- resuming below it gets a snapshot instead of the commands it missed. And an index for the
-- status counts of grants ended lately (`jitctl status`, the metrics).
-- depends: 0004.grant-extensions 0004.replicas

ALTER TABLE agents ADD COLUMN log_start INTEGER NOT NULL DEFAULT 0;

CREATE INDEX grants_ended ON grants(ended_at) WHERE ended_at IS NOT NULL;
