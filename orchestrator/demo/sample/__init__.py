"""The legacy Cogito schema (everything in `public`) and a deterministic data generator.

The sample carries the hard parts real schemas have (see cogito.sql); `generate_data`
fills every table with set-based ``INSERT ... SELECT ... FROM generate_series`` statements,
sized in proportion to the number of turns, with every value passed as a query parameter.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, LiteralString

import psycopg
from psycopg import sql

SCHEMA_RESOURCE = "cogito.sql"

# Tables in load order (parents first), as generate_data fills them.
TABLES: tuple[str, ...] = (
    "clients",
    "users",
    "client_users",
    "projects",
    "llm_configs",
    "prompts",
    "participants",
    "blocks",
    "turns",
    "block_turns",
    "patterns",
    "lens_prototypes",
    "block_lens_version",
    "audit_log",
)

# Fixed epoch for generated timestamps, so that the data does not depend on the clock.
_EPOCH = "2024-01-01 00:00:00+00"


def schema_sql() -> str:
    """The text of cogito.sql, the legacy schema."""
    return resources.files(__package__).joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")


def load_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the legacy schema in `public` of an empty database, and commit."""
    with conn.transaction():
        conn.execute("SET LOCAL search_path = public")
        # One simple-protocol execute of the whole script (no parameters).
        conn.execute(schema_sql().encode())
    conn.commit()


def sizes(turns: int) -> dict[str, int]:
    """How many rows generate_data puts in each table (client_users aside) for `turns`."""
    n_clients = max(2, turns // 2000)
    n_users = max(4, turns // 200)
    n_participants = max(n_users, n_users * 3 // 2)
    n_blocks = max(2, turns // 100)
    return {
        "clients": n_clients,
        "users": n_users,
        "projects": max(2, turns // 1000),
        "llm_configs": 2 * n_clients,
        "prompts": 3 * n_clients,
        "participants": n_participants,
        "blocks": n_blocks,
        "turns": turns,
        "block_turns": turns // 2,
        "patterns": max(1, n_participants // 2),
        "lens_prototypes": max(3, turns // 20_000),
        "block_lens_version": n_blocks,
        "audit_log": n_users,
    }


def _seed_value(seed: int) -> float:
    """Map any integer seed to setseed()'s range [-1, 1], deterministically."""
    return ((seed * 2654435761) % 2**31) / 2**31


def _reserve_ids(conn: psycopg.Connection[Any], table: str, count: int) -> int:
    """Reserve `count` consecutive ids from the table's key sequence; return the first.

    Rows are then inserted with explicit ids lo..lo+count-1, so that children and
    self-references can point at them from the same set-based statement.
    """
    row = conn.execute("SELECT pg_get_serial_sequence(%s, 'id')", (f"public.{table}",)).fetchone()
    assert row is not None and row[0] is not None, f"{table}.id has no sequence"
    seq: str = row[0]
    first = conn.execute("SELECT nextval(%s::regclass)", (seq,)).fetchone()
    assert first is not None
    lo = int(first[0])
    if count > 0:
        conn.execute("SELECT setval(%s::regclass, %s::bigint)", (seq, lo + count - 1))
    return lo


def _insert(conn: psycopg.Connection[Any], query: LiteralString, params: dict[str, Any]) -> int:
    """Run one INSERT ... SELECT; return how many rows it inserted."""
    cur = conn.execute(query, params)
    return max(cur.rowcount, 0)


def _reserve(
    conn: psycopg.Connection[Any], p: dict[str, Any], key: str, table: str, count: int
) -> None:
    """Reserve ids for `count` rows of `table`: the first in p[key_lo], the count in p[key_n]."""
    p[f"{key}_lo"] = _reserve_ids(conn, table, count)
    p[f"{key}_n"] = count


def _fill_accounts(
    conn: psycopg.Connection[Any], n: dict[str, int], p: dict[str, Any]
) -> dict[str, int]:
    """Clients, their users and the client_users memberships."""
    counts: dict[str, int] = {}
    _reserve(conn, p, "c", "clients", n["clients"])
    counts["clients"] = _insert(
        conn,
        """
            INSERT INTO clients (id, name, billing_info, settings) OVERRIDING SYSTEM VALUE
            SELECT %(c_lo)s::bigint + g - 1,
                   'Client ' || g,
                   jsonb_build_object(
                       'plan', (ARRAY['free', 'pro', 'enterprise'])[1 + floor(random() * 3)::int],
                       'seats', 1 + floor(random() * 500)::int,
                       'currency', 'EUR'),
                   jsonb_build_object('theme', (ARRAY['light', 'dark'])[1 + (g %% 2)::int],
                                      'retention_days', 30 + floor(random() * 335)::int)
            FROM generate_series(1, %(c_n)s::bigint) AS g
            """,
        p,
    )

    _reserve(conn, p, "u", "users", n["users"])
    counts["users"] = _insert(
        conn,
        """
            INSERT INTO users (id, email, auth_info, created_at, client_id)
            SELECT %(u_lo)s::bigint + g - 1,
                   'user' || (%(u_lo)s::bigint + g - 1) || '@example.com',
                   jsonb_build_object(
                       'provider',
                       (ARRAY['password', 'google', 'github'])[1 + floor(random() * 3)::int],
                       'mfa', random() < 0.3),
                   %(epoch)s::timestamptz + g * interval '1 minute',
                   %(c_lo)s::bigint + floor(random() * %(c_n)s::bigint)::bigint
            FROM generate_series(1, %(u_n)s::bigint) AS g
            """,
        p,
    )

    counts["client_users"] = _insert(
        conn,
        """
            INSERT INTO client_users (client_id, user_id, role, permissions)
            SELECT u.client_id, u.id,
                   CASE WHEN random() < 0.1 THEN 'owner' ELSE 'member' END,
                   ARRAY['read'] || CASE WHEN random() < 0.5 THEN ARRAY['write'] ELSE '{}' END
            FROM users u
            WHERE u.id BETWEEN %(u_lo)s::bigint AND %(u_lo)s::bigint + %(u_n)s::bigint - 1
            UNION ALL
            SELECT %(c_lo)s::bigint + (u.client_id - %(c_lo)s::bigint + 1) %% %(c_n)s::bigint,
                   u.id, 'guest', ARRAY['read']
            FROM users u
            WHERE u.id BETWEEN %(u_lo)s::bigint AND %(u_lo)s::bigint + %(u_n)s::bigint - 1
              AND u.id %% 5 = 0 AND %(c_n)s::bigint > 1
            """,
        p,
    )
    return counts


def _fill_client_assets(
    conn: psycopg.Connection[Any], n: dict[str, int], p: dict[str, Any]
) -> dict[str, int]:
    """The clients' projects, LLM configurations and prompts."""
    counts: dict[str, int] = {}
    _reserve(conn, p, "pr", "projects", n["projects"])
    counts["projects"] = _insert(
        conn,
        """
            INSERT INTO projects (id, client_id, name, settings)
            SELECT %(pr_lo)s::bigint + g - 1,
                   %(c_lo)s::bigint + floor(random() * %(c_n)s::bigint)::bigint,
                   'Project ' || g,
                   jsonb_build_object('visibility',
                       (ARRAY['private', 'team', 'public'])[1 + floor(random() * 3)::int])
            FROM generate_series(1, %(pr_n)s::bigint) AS g
            """,
        p,
    )

    _reserve(conn, p, "l", "llm_configs", n["llm_configs"])
    counts["llm_configs"] = _insert(
        conn,
        """
            INSERT INTO llm_configs (id, client_id, provider, model, settings)
            SELECT %(l_lo)s::bigint + g - 1,
                   %(c_lo)s::bigint + (g - 1) %% %(c_n)s::bigint,
                   (ARRAY['openai', 'anthropic', 'local'])[1 + (g %% 3)::int],
                   (ARRAY['large', 'medium', 'small'])[1 + floor(random() * 3)::int],
                   jsonb_build_object('temperature', round(random()::numeric, 2),
                                      'max_tokens', 256 * (1 + floor(random() * 16)::int))
            FROM generate_series(1, %(l_n)s::bigint) AS g
            """,
        p,
    )

    _reserve(conn, p, "pm", "prompts", n["prompts"])
    counts["prompts"] = _insert(
        conn,
        """
            INSERT INTO prompts (id, client_id, name, template, variables)
            SELECT %(pm_lo)s::bigint + g - 1,
                   %(c_lo)s::bigint + (g - 1) %% %(c_n)s::bigint,
                   'prompt-' || g,
                   'You are {{role}}. Answer about {{topic}} in ' || (10 + g %% 90) || ' words.',
                   jsonb_build_object('role', 'assistant', 'topic', md5(random()::text))
            FROM generate_series(1, %(pm_n)s::bigint) AS g
            """,
        p,
    )
    return counts


def _fill_conversations(
    conn: psycopg.Connection[Any], n: dict[str, int], p: dict[str, Any]
) -> dict[str, int]:
    """Participants (closing the users <-> participants cycle), blocks and their turns."""
    counts: dict[str, int] = {}
    # The first u_n participants belong one-to-one to the users; the rest to random users.
    _reserve(conn, p, "pa", "participants", n["participants"])
    counts["participants"] = _insert(
        conn,
        """
            INSERT INTO participants (id, user_id, name, type, patterns_metadata)
            SELECT %(pa_lo)s::bigint + g - 1,
                   CASE WHEN g <= %(u_n)s::bigint THEN %(u_lo)s::bigint + g - 1
                        ELSE %(u_lo)s::bigint + floor(random() * %(u_n)s::bigint)::bigint END,
                   'Persona ' || g,
                   CASE WHEN r < 0.70 THEN 'human'
                        WHEN r < 0.95 THEN 'assistant'
                        ELSE 'system' END::participant_type,
                   jsonb_build_object(
                       'style', (ARRAY['terse', 'verbose', 'formal'])[1 + (g %% 3)::int],
                       'score', round(random()::numeric, 3))
            FROM (SELECT g, random() AS r FROM generate_series(1, %(pa_n)s::bigint) AS g) AS s
            """,
        p,
    )

    conn.execute(
        """
            UPDATE users
            SET default_participant_id = %(pa_lo)s::bigint + (id - %(u_lo)s::bigint)
            WHERE id BETWEEN %(u_lo)s::bigint AND %(u_lo)s::bigint + %(u_n)s::bigint - 1
              AND id %% 2 = 0
            """,
        p,
    )

    _reserve(conn, p, "b", "blocks", n["blocks"])
    counts["blocks"] = _insert(
        conn,
        """
            INSERT INTO blocks (id, project_id, llm_config_id, name, type, metadata)
            SELECT %(b_lo)s::bigint + g - 1,
                   %(pr_lo)s::bigint + floor(random() * %(pr_n)s::bigint)::bigint,
                   CASE WHEN random() < 0.3 THEN NULL
                        ELSE %(l_lo)s::bigint + floor(random() * %(l_n)s::bigint)::bigint END,
                   'Block ' || g,
                   (ARRAY['conversation', 'analysis', 'summary'])[1 + floor(random() * 3)::int],
                   jsonb_build_object('tags', jsonb_build_array('t' || (g %% 7), 't' || (g %% 11)))
            FROM generate_series(1, %(b_n)s::bigint) AS g
            """,
        p,
    )

    # About 30% of turns reply to an earlier turn (the self-reference).
    _reserve(conn, p, "t", "turns", n["turns"])
    counts["turns"] = _insert(
        conn,
        """
            INSERT INTO turns (id, participant_id, reply_to_turn_id, content, "timestamp",
                               metadata, llm_config_id, updated_at)
            SELECT %(t_lo)s::bigint + g - 1,
                   %(pa_lo)s::bigint + floor(random() * %(pa_n)s::bigint)::bigint,
                   CASE WHEN g > 1 AND random() < 0.3
                        THEN %(t_lo)s::bigint + floor(random() * (g - 1))::bigint END,
                   'Turn ' || g || ': ' || repeat(md5(random()::text), 1 + (g %% 4)::int),
                   ts,
                   jsonb_build_object('tokens', 1 + floor(random() * 2000)::int,
                                      'lang', (ARRAY['en', 'fr', 'de'])[1 + (g %% 3)::int]),
                   CASE WHEN random() < 0.5 THEN NULL
                        ELSE %(l_lo)s::bigint + floor(random() * %(l_n)s::bigint)::bigint END,
                   ts
            FROM (SELECT g, %(epoch)s::timestamptz + g * interval '1 second' AS ts
                  FROM generate_series(1, %(t_n)s::bigint) AS g) AS s
            """,
        p,
    )

    # Every other turn in a random block; sequence_order numbers them within the block.
    p["bt_n"] = n["block_turns"]
    counts["block_turns"] = _insert(
        conn,
        """
            INSERT INTO block_turns (block_id, turn_id, sequence_order)
            SELECT block_id, turn_id,
                   row_number() OVER (PARTITION BY block_id ORDER BY turn_id)::int
            FROM (SELECT %(b_lo)s::bigint + floor(random() * %(b_n)s::bigint)::bigint AS block_id,
                         %(t_lo)s::bigint + 2 * (g - 1) AS turn_id
                  FROM generate_series(1, %(bt_n)s::bigint) AS g) AS s
            """,
        p,
    )
    return counts


def _fill_analyses(
    conn: psycopg.Connection[Any], n: dict[str, int], p: dict[str, Any]
) -> dict[str, int]:
    """Participant patterns, lens prototypes and each block's lens version."""
    counts: dict[str, int] = {}
    _reserve(conn, p, "pt", "patterns", n["patterns"])
    counts["patterns"] = _insert(
        conn,
        """
            INSERT INTO patterns (id, participant_id, analysis)
            SELECT %(pt_lo)s::bigint + g - 1,
                   %(pa_lo)s::bigint + floor(random() * %(pa_n)s::bigint)::bigint,
                   jsonb_build_object('sentiment', round((random() * 2 - 1)::numeric, 3),
                                      'topics', jsonb_build_array('t' || (g %% 13)))
            FROM generate_series(1, %(pt_n)s::bigint) AS g
            """,
        p,
    )

    _reserve(conn, p, "lp", "lens_prototypes", n["lens_prototypes"])
    counts["lens_prototypes"] = _insert(
        conn,
        """
            INSERT INTO lens_prototypes (id, name, prompt_template)
            SELECT %(lp_lo)s::bigint + g - 1,
                   'lens-' || g,
                   'Read the block through lens ' || g || ': {{block}}'
            FROM generate_series(1, %(lp_n)s::bigint) AS g
            """,
        p,
    )

    # The embedding subquery is correlated with g (WHERE g > 0) so it runs per row.
    _reserve(conn, p, "blv", "block_lens_version", n["block_lens_version"])
    counts["block_lens_version"] = _insert(
        conn,
        """
            INSERT INTO block_lens_version (id, block_id, lens_id, result, embedding)
            SELECT %(blv_lo)s::bigint + g - 1,
                   %(b_lo)s::bigint + (g - 1) %% %(b_n)s::bigint,
                   %(lp_lo)s::bigint + floor(random() * %(lp_n)s::bigint)::bigint,
                   jsonb_build_object('summary', md5(random()::text),
                                      'confidence', round(random()::numeric, 3)),
                   ARRAY(SELECT random()::real FROM generate_series(1, 8) WHERE g > 0)
            FROM generate_series(1, %(blv_n)s::bigint) AS g
            """,
        p,
    )
    return counts


def _fill_audit_log(
    conn: psycopg.Connection[Any], n: dict[str, int], p: dict[str, Any]
) -> dict[str, int]:
    """The audit log, a tenth of its rows without a user."""
    counts: dict[str, int] = {}
    _reserve(conn, p, "al", "audit_log", n["audit_log"])
    counts["audit_log"] = _insert(
        conn,
        """
            INSERT INTO audit_log (id, user_id, action, at)
            SELECT %(al_lo)s::bigint + g - 1,
                   CASE WHEN random() < 0.1 THEN NULL
                        ELSE %(u_lo)s::bigint + floor(random() * %(u_n)s::bigint)::bigint END,
                   (ARRAY['login', 'logout', 'export', 'invite'])[1 + floor(random() * 4)::int],
                   %(epoch)s::timestamptz + g * interval '30 seconds'
            FROM generate_series(1, %(al_n)s::bigint) AS g
            """,
        p,
    )
    return counts


def generate_data(
    conn: psycopg.Connection[Any], turns: int = 200_000, seed: int = 1
) -> dict[str, int]:
    """Fill every table of the legacy schema; return the rows inserted per table.

    Deterministic for a given seed on a freshly loaded schema. Sizes follow `sizes(turns)`;
    client_users holds one row per user plus a second membership for every fifth user.
    Some turns reply to earlier turns, and every other user gets a default participant
    (set by an UPDATE once participants exist, closing the users <-> participants cycle).
    """
    if turns < 0:
        raise ValueError("turns must be >= 0")
    n = sizes(turns)
    counts: dict[str, int] = {}
    with conn.transaction():
        conn.execute("SET LOCAL search_path = public")
        conn.execute("SELECT setseed(%s::float8)", (_seed_value(seed),))
        p: dict[str, Any] = {"epoch": _EPOCH}
        for fill in (
            _fill_accounts,
            _fill_client_assets,
            _fill_conversations,
            _fill_analyses,
            _fill_audit_log,
        ):
            counts.update(fill(conn, n, p))

        for table in TABLES:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier("public", table)))
    conn.commit()
    return {table: counts[table] for table in TABLES}
