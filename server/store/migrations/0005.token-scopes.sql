-- What a token may do (issue 13): '' = everything its user may do; otherwise space-separated
-- scopes ("review-on-behalf": a notification bridge's delegated credential, which may only
-- review in the name of a user it authenticated).
-- depends: 0003.notify-and-sign-in

ALTER TABLE tokens ADD COLUMN scopes TEXT NOT NULL DEFAULT '';
