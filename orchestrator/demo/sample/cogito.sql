-- The legacy Cogito schema: everything in one flat `public` schema.
-- Runs once on an empty database with search_path = public.
-- It carries the hard parts real schemas have: an identity column, serial
-- sequences, a secondary unique, a foreign-key cycle (users <-> participants),
-- composite keys, array columns, an enum, ON DELETE CASCADE, a CHECK
-- constraint, a self-reference, a quoted column name ("timestamp"), a user
-- trigger, an inbound foreign key from a table that stays (audit_log) and a
-- view over tables that move (active_projects).

CREATE TYPE participant_type AS ENUM ('human', 'assistant', 'system');

CREATE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TABLE clients (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL,
    billing_info jsonb,
    settings     jsonb
);

CREATE TABLE users (
    id                     bigserial PRIMARY KEY,
    email                  text NOT NULL UNIQUE,
    auth_info              jsonb,
    created_at             timestamptz DEFAULT now(),
    client_id              bigint REFERENCES clients (id),
    default_participant_id bigint
);

CREATE TABLE client_users (
    client_id   bigint NOT NULL REFERENCES clients (id),
    user_id     bigint NOT NULL REFERENCES users (id),
    role        text,
    permissions text[],
    PRIMARY KEY (client_id, user_id)
);

CREATE TABLE projects (
    id        bigserial PRIMARY KEY,
    client_id bigint NOT NULL REFERENCES clients (id),
    name      text NOT NULL,
    settings  jsonb
);

CREATE TABLE llm_configs (
    id        bigserial PRIMARY KEY,
    client_id bigint NOT NULL REFERENCES clients (id),
    provider  text NOT NULL,
    model     text NOT NULL,
    settings  jsonb
);

CREATE TABLE prompts (
    id        bigserial PRIMARY KEY,
    client_id bigint NOT NULL REFERENCES clients (id),
    name      text NOT NULL,
    template  text,
    variables jsonb,
    CONSTRAINT prompts_name_not_blank CHECK (length(name) > 0)
);

CREATE TABLE participants (
    id                bigserial PRIMARY KEY,
    user_id           bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name              text NOT NULL,
    type              participant_type NOT NULL DEFAULT 'human',
    patterns_metadata jsonb
);

-- Closes the users <-> participants foreign-key cycle.
ALTER TABLE users
    ADD CONSTRAINT users_default_participant_id_fkey
    FOREIGN KEY (default_participant_id) REFERENCES participants (id);

CREATE TABLE blocks (
    id            bigserial PRIMARY KEY,
    project_id    bigint NOT NULL REFERENCES projects (id),
    llm_config_id bigint REFERENCES llm_configs (id),
    name          text,
    type          text,
    metadata      jsonb
);

CREATE TABLE turns (
    id               bigserial PRIMARY KEY,
    participant_id   bigint NOT NULL REFERENCES participants (id),
    reply_to_turn_id bigint REFERENCES turns (id),
    content          text,
    "timestamp"      timestamptz DEFAULT now(),
    metadata         jsonb,
    llm_config_id    bigint REFERENCES llm_configs (id),
    updated_at       timestamptz DEFAULT now()
);

CREATE TRIGGER turns_touch_updated_at
    BEFORE UPDATE ON turns
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

CREATE TABLE block_turns (
    block_id       bigint NOT NULL REFERENCES blocks (id),
    turn_id        bigint NOT NULL REFERENCES turns (id),
    sequence_order integer NOT NULL,
    PRIMARY KEY (block_id, turn_id)
);

CREATE TABLE patterns (
    id             bigserial PRIMARY KEY,
    participant_id bigint NOT NULL REFERENCES participants (id),
    analysis       jsonb
);

CREATE TABLE lens_prototypes (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL,
    prompt_template text
);

CREATE TABLE block_lens_version (
    id        bigserial PRIMARY KEY,
    block_id  bigint NOT NULL REFERENCES blocks (id),
    lens_id   bigint NOT NULL REFERENCES lens_prototypes (id),
    result    jsonb,
    embedding real[]
);

-- Stays in public: an inbound foreign key from outside the plan.
CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    user_id bigint REFERENCES users (id),
    action  text NOT NULL,
    at      timestamptz DEFAULT now()
);

CREATE INDEX users_client_id_idx ON users (client_id);
CREATE INDEX participants_user_id_idx ON participants (user_id);
CREATE INDEX blocks_project_id_idx ON blocks (project_id);
CREATE INDEX turns_participant_id_idx ON turns (participant_id);
CREATE INDEX turns_reply_to_turn_id_idx ON turns (reply_to_turn_id);
CREATE INDEX block_turns_turn_id_idx ON block_turns (turn_id);

CREATE VIEW active_projects AS
SELECT p.id, p.name, c.name AS client_name
FROM projects p
JOIN clients c ON c.id = p.client_id;
