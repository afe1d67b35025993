-- Approval plans: each request pins the plan it was created under (JSON: policy version, rule,
-- stages with their approver groups and users, approve windows) and its ticket id; each review
-- records the plan's groups the reviewer was in when reviewing. '' = a request from before plans
-- (read as one stage of approvals_required from approver_groups).
-- depends: 0002.enrollment-and-certificates 0002.locks

ALTER TABLE requests ADD COLUMN plan TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN ticket TEXT NOT NULL DEFAULT '';
ALTER TABLE reviews ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
