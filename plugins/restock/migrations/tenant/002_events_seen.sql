-- fleet:version 1.1.0
-- Events are delivered at least once: the ids of the ones handled, recorded in the same
-- transaction as their effect, so a repeat changes nothing. Rows older than the
-- redelivery horizon are deleted by the count_open job.
CREATE TABLE restock_events_seen (
    event_id  uuid PRIMARY KEY,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX restock_events_seen_at_idx ON restock_events_seen (seen_at);
