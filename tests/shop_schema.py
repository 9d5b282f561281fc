"""A second legacy schema ("shop") with shapes Cogito does not have, for the audit tests.

- composite keys and a composite foreign key (order_lines, shipments), the latter unindexed;
- a missing constraint with orphans: orders.customer_id (bigint) → customers.id (integer),
  no foreign key, two orphan values in three rows;
- a missing constraint without orphans: shipments.carrier_id → carriers.id;
- a table without a primary key but with a unique NOT NULL key (warehouses.code), and tables
  with no usable key at all (stock, event_log);
- a self-reference (employees.manager_id, deferrable) and a two-table cycle
  (departments ↔ employees);
- a mixed-case table name ("Invoices") and an isolated table (event_log).
"""

from __future__ import annotations

from typing import Any

import psycopg

SHOP_SQL = """
CREATE TABLE customers (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint,
    placed_at timestamptz DEFAULT now()
);
CREATE TABLE products (sku text PRIMARY KEY, title text);
CREATE TABLE order_lines (
    order_id bigint REFERENCES orders (id) ON DELETE CASCADE,
    line_no integer,
    product_sku text REFERENCES products (sku) ON UPDATE CASCADE,
    qty integer NOT NULL DEFAULT 1,
    PRIMARY KEY (order_id, line_no)
);
CREATE TABLE carriers (id integer PRIMARY KEY, name text);
CREATE TABLE shipments (
    id serial PRIMARY KEY,
    order_id bigint,
    line_no integer,
    carrier_id integer,
    FOREIGN KEY (order_id, line_no) REFERENCES order_lines (order_id, line_no) ON DELETE SET NULL
);
CREATE TABLE warehouses (code text NOT NULL UNIQUE, city text);
CREATE TABLE stock (
    warehouse_code text NOT NULL REFERENCES warehouses (code),
    product_sku text NOT NULL REFERENCES products (sku),
    qty integer
);
CREATE TABLE departments (id integer PRIMARY KEY, name text, head_id integer);
CREATE TABLE employees (
    id integer PRIMARY KEY,
    department_id integer REFERENCES departments (id),
    manager_id integer REFERENCES employees (id) DEFERRABLE,
    name text
);
ALTER TABLE departments ADD CONSTRAINT departments_head_fkey
    FOREIGN KEY (head_id) REFERENCES employees (id);
CREATE TABLE "Invoices" (id integer PRIMARY KEY, customer_id integer REFERENCES customers (id));
CREATE TABLE event_log (at timestamptz, payload jsonb);

INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace'), (3, 'Linus');
INSERT INTO orders (customer_id) VALUES (1), (2), (99), (99), (100), (NULL);
INSERT INTO products VALUES ('A-1', 'anvil'), ('B-2', 'bolt');
INSERT INTO order_lines VALUES (1, 1, 'A-1', 2), (1, 2, 'B-2', 1), (2, 1, 'A-1', 5);
INSERT INTO carriers VALUES (1, 'post'), (2, 'courier');
INSERT INTO shipments (order_id, line_no, carrier_id) VALUES (1, 1, 1), (2, 1, 2);
INSERT INTO warehouses VALUES ('north', 'Oslo'), ('south', 'Rome');
INSERT INTO stock VALUES ('north', 'A-1', 10), ('south', 'B-2', 3);
INSERT INTO departments VALUES (1, 'ops', NULL);
INSERT INTO employees VALUES (1, 1, NULL, 'Edsger'), (2, 1, 1, 'Barbara');
UPDATE departments SET head_id = 1;
INSERT INTO "Invoices" VALUES (1, 1);
INSERT INTO event_log VALUES (now(), '{}');
"""

SHOP_TABLES = (
    "Invoices",
    "carriers",
    "customers",
    "departments",
    "employees",
    "event_log",
    "order_lines",
    "orders",
    "products",
    "shipments",
    "stock",
    "warehouses",
)


def load_shop(dsn: str, schema: str = "public") -> None:
    """Create the shop schema's tables in `schema` of the database at dsn."""
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
        conn.execute(SHOP_SQL.encode())
        conn.execute("ANALYZE")


def rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return list(conn.execute(query.encode(), params).fetchall())
