"""Schema versions, applied in order and recorded in ``schema_migrations``.
Plain SQL that PostgreSQL also accepts (TEXT, INTEGER, BLOB->BYTEA aside)."""

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE orgs (
            name TEXT PRIMARY KEY,
            created_at TEXT NOT NULL
        );
        CREATE TABLE pools (
            org TEXT NOT NULL REFERENCES orgs(name),
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (org, name)
        );
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL REFERENCES orgs(name),
            name TEXT NOT NULL,
            secret_hash BLOB NOT NULL,
            scopes TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        );
        CREATE TABLE enrollment_tokens (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL,
            pool TEXT NOT NULL,
            secret_hash BLOB NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT,
            revoked_at TEXT,
            FOREIGN KEY (org, pool) REFERENCES pools(org, name)
        );
        CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL,
            pool TEXT NOT NULL,
            name TEXT NOT NULL,
            cert_serial TEXT NOT NULL,
            cert_not_after TEXT NOT NULL,
            enrolled_at TEXT NOT NULL,
            last_seen_at TEXT,
            revoked_at TEXT,
            FOREIGN KEY (org, pool) REFERENCES pools(org, name)
        );
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL REFERENCES orgs(name),
            pool TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            exit_code INTEGER,
            status_reason TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            agent_id TEXT NOT NULL DEFAULT '',
            epoch INTEGER NOT NULL DEFAULT 0,
            data_key BLOB NOT NULL,
            log_size INTEGER NOT NULL DEFAULT 0,
            last_seq INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX jobs_queue ON jobs (org, pool, status, id);
        CREATE INDEX jobs_by_org ON jobs (org, id);
        CREATE TABLE job_transitions (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            n INTEGER NOT NULL,
            status TEXT NOT NULL,
            at TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (job_id, n)
        );
        CREATE TABLE log_entries (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            seq INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            byte_offset INTEGER NOT NULL,
            stream INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (job_id, seq, idx)
        );
        CREATE INDEX log_by_offset ON log_entries (job_id, byte_offset);
        """,
    ),
]

MIGRATIONS.append(
    (
        2,
        """
        ALTER TABLE pools ADD COLUMN agent_cert_ttl_s INTEGER;
        ALTER TABLE agents ADD COLUMN cert_issuer TEXT NOT NULL DEFAULT '';
        CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            org TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            details TEXT NOT NULL,
            source_ip TEXT NOT NULL,
            prev_hash BLOB NOT NULL,
            hash BLOB NOT NULL
        );
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash BLOB NOT NULL,
            mac BLOB NOT NULL
        );
        """,
    )
)

MIGRATIONS.append(
    (
        3,
        """
        ALTER TABLE pools ADD COLUMN allowed_images TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE pools ADD COLUMN pull_policy TEXT NOT NULL DEFAULT 'if-not-present';
        ALTER TABLE pools ADD COLUMN runtime TEXT NOT NULL DEFAULT '';
        CREATE TABLE blobs (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL REFERENCES orgs(name),
            kind TEXT NOT NULL,
            job_id TEXT,
            path TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL DEFAULT 0,
            sha256 TEXT NOT NULL DEFAULT '',
            data_key BLOB NOT NULL,
            created_at TEXT NOT NULL,
            complete INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX blobs_by_job ON blobs (job_id, kind, path);
        CREATE TABLE blob_chunks (
            blob_id TEXT NOT NULL REFERENCES blobs(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (blob_id, idx)
        );
        CREATE TABLE secrets (
            org TEXT NOT NULL REFERENCES orgs(name),
            name TEXT NOT NULL,
            data_key BLOB NOT NULL,
            value BLOB NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (org, name)
        );
        CREATE TABLE test_reports (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            path TEXT NOT NULL,
            error TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (job_id, path)
        );
        CREATE TABLE test_cases (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            path TEXT NOT NULL,
            n INTEGER NOT NULL,
            suite TEXT NOT NULL,
            classname TEXT NOT NULL,
            name TEXT NOT NULL,
            duration_s REAL NOT NULL,
            status TEXT NOT NULL,
            message TEXT NOT NULL,
            PRIMARY KEY (job_id, path, n)
        );
        """,
    )
)

MIGRATIONS.append(
    (
        4,
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL REFERENCES orgs(name),
            name TEXT NOT NULL,
            password_hash BLOB,
            scopes TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT,
            UNIQUE (org, name)
        );
        ALTER TABLE api_keys ADD COLUMN owner TEXT NOT NULL DEFAULT '';
        ALTER TABLE api_keys ADD COLUMN expires_at TEXT;
        ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
        CREATE TABLE refresh_tokens (
            id TEXT PRIMARY KEY,
            family TEXT NOT NULL,
            org TEXT NOT NULL,
            principal_kind TEXT NOT NULL,
            principal_id TEXT NOT NULL,
            scopes TEXT NOT NULL,
            secret_hash BLOB NOT NULL,
            created_at TEXT NOT NULL,
            family_expires_at TEXT NOT NULL,
            used_at TEXT,
            revoked_at TEXT
        );
        CREATE INDEX refresh_by_family ON refresh_tokens (family);
        CREATE INDEX refresh_by_principal ON refresh_tokens (principal_kind, principal_id);
        CREATE TABLE auth_failures (
            subject TEXT NOT NULL,
            at TEXT NOT NULL
        );
        CREATE INDEX auth_failures_by_subject ON auth_failures (subject, at);
        """,
    )
)

MIGRATIONS.append(
    (
        5,
        """
        ALTER TABLE jobs ADD COLUMN lease_expires_at TEXT;
        ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE jobs ADD COLUMN retry_of TEXT NOT NULL DEFAULT '';
        ALTER TABLE jobs ADD COLUMN retried_as TEXT NOT NULL DEFAULT '';
        ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX jobs_by_lease ON jobs (status, lease_expires_at);
        """,
    )
)

MIGRATIONS.append(
    (
        6,
        """
        ALTER TABLE agents ADD COLUMN version TEXT NOT NULL DEFAULT '';
        """,
    )
)

MIGRATIONS.append(
    (
        7,
        """
        CREATE TABLE address_failures (
            address TEXT PRIMARY KEY,
            failures INTEGER NOT NULL,
            first_at TEXT NOT NULL,
            last_at TEXT NOT NULL
        );
        CREATE INDEX address_failures_by_last ON address_failures (last_at);
        """,
    )
)

# What each agent announced in its last hello (labels, runtimes, capacity), for `agents list`,
# and which serve process holds its stream ('pid:N', '' when none): PostgreSQL's agents.replica.
MIGRATIONS.append(
    (
        8,
        """
        ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
        ALTER TABLE agents ADD COLUMN runtimes TEXT NOT NULL DEFAULT '';
        ALTER TABLE agents ADD COLUMN max_jobs INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE agents ADD COLUMN replica TEXT NOT NULL DEFAULT '';
        """,
    )
)

# Pausing a pool (Admin API and `pools pause`): a paused pool dispatches nothing new; when it was
# last resumed, so that a serve learns of a resumption made by an operator's command in another process.
MIGRATIONS.append(
    (
        9,
        """
        ALTER TABLE pools ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE pools ADD COLUMN resumed_at TEXT;
        """,
    )
)

# Access administration: when a job last received each secret (and which job); per organisation,
# the longest lifetime an API key with an admin scope may have (seconds, default 90 days, NULL: no
# limit), and when the organisation was revoked.
MIGRATIONS.append(
    (
        10,
        """
        ALTER TABLE secrets ADD COLUMN last_used_at TEXT;
        ALTER TABLE secrets ADD COLUMN last_used_by_job TEXT NOT NULL DEFAULT '';
        ALTER TABLE orgs ADD COLUMN admin_key_max_lifetime_s INTEGER DEFAULT 7776000;
        ALTER TABLE orgs ADD COLUMN revoked_at TEXT;
        """,
    )
)

# Users' TOTP second factors (auth/mfa.py): each factor's secret sealed under its own data key
# (re-wrapped by master-key rotation like the others), pending until confirmed (confirmed_at), the
# last time step accepted (a code is accepted once), and its one-use recovery codes, hashed. And
# how each session was authenticated (RFC 8176 amr values, space-separated), kept across refreshes.
MIGRATIONS.append(
    (
        11,
        """
        CREATE TABLE mfa_factors (
            id TEXT PRIMARY KEY,
            org TEXT NOT NULL,
            user_id TEXT NOT NULL REFERENCES users(id),
            data_key BLOB NOT NULL,
            secret BLOB NOT NULL,
            created_at TEXT NOT NULL,
            confirmed_at TEXT,
            last_step INTEGER
        );
        CREATE UNIQUE INDEX mfa_factors_one_of_each_per_user
            ON mfa_factors (org, user_id, (confirmed_at IS NULL));
        CREATE TABLE mfa_recovery_codes (
            factor_id TEXT NOT NULL REFERENCES mfa_factors(id),
            code_hash BLOB NOT NULL,
            used_at TEXT,
            PRIMARY KEY (factor_id, code_hash)
        );
        ALTER TABLE refresh_tokens ADD COLUMN amr TEXT NOT NULL DEFAULT '';
        """,
    )
)

# What the agent read back from a job's container (JSON of jobs.model.Isolation; NULL until it
# started), and the host name each agent announced in its last hello, for `jobs show`.
MIGRATIONS.append(
    (
        12,
        """
        ALTER TABLE jobs ADD COLUMN isolation TEXT;
        ALTER TABLE agents ADD COLUMN host TEXT NOT NULL DEFAULT '';
        """,
    )
)

# Pools' egress lists (JSON list of HOST or HOST:PORT the fetch step may reach through the egress
# proxy; empty: no fetch step runs), and what a job's fetch step did (JSON of jobs.model.FetchStep;
# NULL until its agent reported it; not named "fetch", a reserved word of PostgreSQL's).
MIGRATIONS.append(
    (
        13,
        """
        ALTER TABLE pools ADD COLUMN egress_allow TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE jobs ADD COLUMN fetch_step TEXT;
        """,
    )
)

# Tamper-evident job logs (common/evidence.py): each stored log batch's chain link, one row per
# batch (a batch may hold no entry, and its link is one value, not one per entry); on the job, the
# chain's head after its last stored batch (NULL until its first batch, and for ever for a job whose
# log began before this version: it carries no chain) and the head its agent reported with the
# result (NULL: none reported, as from agents older than the chain).
MIGRATIONS.append(
    (
        14,
        """
        CREATE TABLE log_batches (
            job_id TEXT NOT NULL REFERENCES jobs(id),
            seq INTEGER NOT NULL,
            chain BLOB NOT NULL,
            PRIMARY KEY (job_id, seq)
        );
        ALTER TABLE jobs ADD COLUMN log_chain BLOB;
        ALTER TABLE jobs ADD COLUMN agent_log_chain BLOB;
        """,
    )
)

# Signed job statements (common/statement.py). The control plane's statement-signing keys: the
# private key (PKCS#8 DER) sealed under the key's own data key (wrapped by the master key and
# re-wrapped by its rotation, like the others), the certificate the CA issued for it (DER), when
# it stops signing (active_until) and when an operator retired it. And each job's statement as
# its agent sent it, with the agent's signature and certificate, the control plane's
# countersignature and the key that made it (NULL when it was not countersigned), and the first
# field that disagreed with what the control plane stored (empty: none).
MIGRATIONS.append(
    (
        15,
        """
        CREATE TABLE statement_keys (
            id TEXT PRIMARY KEY,
            data_key BLOB NOT NULL,
            private_key BLOB NOT NULL,
            certificate BLOB NOT NULL,
            created_at TEXT NOT NULL,
            active_until TEXT NOT NULL,
            retired_at TEXT
        );
        CREATE TABLE job_statements (
            job_id TEXT PRIMARY KEY REFERENCES jobs(id),
            org TEXT NOT NULL,
            payload BLOB NOT NULL,
            agent_signature BLOB NOT NULL,
            agent_certificate BLOB NOT NULL,
            countersignature BLOB,
            signing_key_id TEXT REFERENCES statement_keys(id),
            mismatch TEXT NOT NULL DEFAULT '',
            recorded_at TEXT NOT NULL
        );
        """,
    )
)

# The scope of an incident (operations/incident.py): the jobs an agent holds or held, those handed to
# it and taken back (their ASSIGNED transitions say "agent ID"; the literal 'ASSIGNED' in the query
# matches this partial index), and the certificates issued to it (audit entries with it as target).
MIGRATIONS.append(
    (
        16,
        """
        CREATE INDEX jobs_by_agent ON jobs (agent_id);
        CREATE INDEX job_assignments ON job_transitions (reason) WHERE status = 'ASSIGNED';
        CREATE INDEX audit_by_target ON audit_log (target, seq);
        """,
    )
)

# What the agent read back from each of a job's services' containers (JSON list of
# {"name", "isolation"}, jobs.model.ServiceIsolation; NULL: none reported).
MIGRATIONS.append((17, "ALTER TABLE jobs ADD COLUMN service_isolation TEXT;"))
