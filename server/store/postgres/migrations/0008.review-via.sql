-- The delegate that relayed a review (as server/store/migrations/0006.review-via.sql).

ALTER TABLE reviews ADD COLUMN via TEXT NOT NULL DEFAULT '';
