-- The delegate that relayed a review for its reviewer (issue 13: a bridge's review-on-behalf
-- token, or the Slack endpoint); '' when the reviewer acted in person.
-- depends: 0005.token-scopes 0003.approval-plans

ALTER TABLE reviews ADD COLUMN via TEXT NOT NULL DEFAULT '';
