-- fleet:version 1.0.0
-- Runs with search_path = <tenant schema>, public: names stay unqualified.
CREATE TABLE items (
    id          bigserial PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    name        text,
    qty         integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
