-- fleet:version 1.0.0
CREATE TABLE restock_requests (
    id            bigserial PRIMARY KEY,
    sku           text NOT NULL,
    qty           integer NOT NULL CHECK (qty > 0),
    status        text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'ordered', 'received', 'cancelled')),
    requested_at  timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX restock_requests_open_idx ON restock_requests (sku) WHERE status = 'open';
