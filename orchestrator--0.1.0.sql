/* orchestrator--0.1.0.sql: schema orch, its tables, functions and grants */

\echo Use "CREATE EXTENSION orchestrator" to load this file. \quit

/* ------------------------------------------------------------------------
 * Roles.  Cluster-wide objects, so they are created only when missing and
 * survive DROP EXTENSION (like any role a DBA would create by hand).
 * ------------------------------------------------------------------------ */
DO $roles$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'orch_reader') THEN
		CREATE ROLE orch_reader NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'orch_worker') THEN
		CREATE ROLE orch_worker NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'orch_operator') THEN
		CREATE ROLE orch_operator NOLOGIN IN ROLE orch_reader;
	END IF;
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'orch_admin') THEN
		CREATE ROLE orch_admin NOLOGIN IN ROLE orch_operator;
	END IF;
END
$roles$;

/* ------------------------------------------------------------------------
 * Types
 *
 * Statuses are enums rather than text with CHECK constraints: the engine
 * updates these rows for every step, and a CHECK constraint's expression is
 * read back from its text on every statement, where an enum or a domain's
 * constraint is cached.
 * ------------------------------------------------------------------------ */
CREATE TYPE orch.run_status AS ENUM
	('pending', 'running', 'waiting', 'retrying', 'needs_approval', 'needs_human',
	 'blocked', 'paused', 'succeeded', 'failed', 'cancelled', 'timed_out');

CREATE TYPE orch.step_status AS ENUM
	('pending', 'ready', 'running', 'waiting', 'retrying', 'needs_approval', 'needs_human',
	 'blocked', 'succeeded', 'failed', 'skipped', 'cancelled', 'compensated');

CREATE TYPE orch.attempt_outcome AS ENUM ('succeeded', 'failed');

CREATE TYPE orch.attempt_kind AS ENUM ('run', 'verify', 'compensate');

CREATE DOMAIN orch.counter AS int CHECK (VALUE >= 0);

-- A W3C trace id: 16 bytes.
CREATE DOMAIN orch.trace_id AS bytea CHECK (pg_catalog.length(VALUE) = 16);

/* ------------------------------------------------------------------------
 * Tables
 * ------------------------------------------------------------------------ */

-- One row per version of a workflow definition, as given (normalized JSON).
CREATE TABLE orch.workflows (
	name		text		NOT NULL,
	version		int			NOT NULL CHECK (version > 0),
	definition	jsonb		NOT NULL,
	created_at	timestamptz	NOT NULL DEFAULT pg_catalog.now(),
	created_by	name		NOT NULL,
	PRIMARY KEY (name, version)
);

-- Named retry policies, reusable across workflows.  A workflow copies the
-- policy when it is defined, so changing a policy changes the workflows
-- defined after the change, never a version that runs already use.
CREATE TABLE orch.retry_policies (
	name		text		PRIMARY KEY,
	policy		jsonb		NOT NULL,	-- completed with the defaults
	definition	jsonb		NOT NULL,	-- as given
	updated_at	timestamptz	NOT NULL DEFAULT pg_catalog.now(),
	updated_by	name		NOT NULL
);

-- Task queues with a limit on the tasks leased at once.  A queue without a
-- row here has no limit.
CREATE TABLE orch.queues (
	name		text		PRIMARY KEY,
	max_running	int			CHECK (max_running > 0),
	changed_at	timestamptz	NOT NULL DEFAULT pg_catalog.now()
);

-- Circuit breakers, one per named target that steps call ("circuit" in a
-- step).  closed: steps run; open: steps wait, status blocked, burning no
-- attempt, until the cooldown has passed; half_open: one probe runs, and
-- its outcome closes or opens the circuit again.
CREATE TABLE orch.circuits (
	name		text		PRIMARY KEY,
	state		text		NOT NULL DEFAULT 'closed'
							CHECK (state IN ('closed', 'open', 'half_open')),
	failures	int			NOT NULL DEFAULT 0,	-- consecutive
	threshold	int			NOT NULL DEFAULT 5 CHECK (threshold > 0),
	cooldown	interval	NOT NULL DEFAULT '30 seconds' CHECK (cooldown > '0'),
	opened_at	timestamptz,
	changed_at	timestamptz	NOT NULL DEFAULT pg_catalog.now()
);

-- The compiled form of each step of each version: what the engine reads.
CREATE TABLE orch.workflow_steps (
	workflow		text		NOT NULL,
	version			int			NOT NULL,
	name			text		NOT NULL,
	ordinal			int			NOT NULL,
	kind			text		NOT NULL CHECK (kind IN ('sql', 'sleep', 'task', 'wait_event', 'approval', 'subworkflow', 'map')),
	needs			text[]		NOT NULL DEFAULT '{}',
	dependents		text[]		NOT NULL DEFAULT '{}',
	guard			jsonpath,
	function_name	text,
	function		regprocedure,
	sleep_for		interval,
	sleep_until		jsonpath,
	queue			text,
	circuit			text,
	schedule_to_start interval,
	heartbeat_timeout interval,
	max_attempts	int			NOT NULL DEFAULT 3,
	initial_interval interval	NOT NULL DEFAULT '1 second',
	backoff_coefficient float8	NOT NULL DEFAULT 2.0,
	max_interval	interval	NOT NULL DEFAULT '100 seconds',
	jitter			boolean		NOT NULL DEFAULT false,
	non_retryable	text[],
	schedule_to_close interval,
	retry_policy	text,
	timeout			interval,
	idempotent		boolean		NOT NULL DEFAULT false,	-- a task safe to redo
	verify_name		text,		-- decides unknown outcomes
	verify			regprocedure,
	compensate_name	text,		-- undoes the step when its run fails
	compensate		regprocedure,
	on_error		jsonb,		-- [{"errors": [...] or null, "goto": step | "human": true}]
	routes			text[]		NOT NULL DEFAULT '{}',	-- the steps on_error goes to
	route_target	boolean		NOT NULL DEFAULT false,	-- runs only when routed to
	event			text,		-- wait_event: the name of the event it waits for
	on_timeout		text,		-- wait_event: fail, skip or human when timeout passes
	input_schema	jsonb,		-- what the step's context must be (sql, task)
	output_schema	jsonb,		-- what its output must be
	review_if		jsonpath,	-- an output it matches waits for a person's review
	-- approval: who decides, how many, and what they are shown (jsonpaths
	-- over the run context); on_timeout is reject, human or escalate
	approvers		text,
	quorum			int,
	allow_self		boolean,
	approval_payload jsonpath,
	approval_target	jsonpath,
	approval_evidence jsonpath,
	escalate_to		text,
	-- subworkflow: the workflow of the child run, and its input (a jsonpath
	-- over the run context; the run's own input when NULL)
	subworkflow		text,
	sub_input		jsonpath,
	-- map: the items (a jsonpath to an array), how many children run at
	-- once, and how many may fail (a count, or a percentage of the items)
	map_items		jsonpath,
	max_concurrency	int,
	tolerated_failures int,
	tolerated_pct	numeric,
	PRIMARY KEY (workflow, version, name),
	FOREIGN KEY (workflow, version) REFERENCES orch.workflows ON DELETE CASCADE
);

-- Run identifiers are UUID version 7: time-ordered, so the indexes on
-- run_id grow at their right edge (src/uuid_v7.c).
CREATE FUNCTION orch._uuid_v7() RETURNS uuid
	LANGUAGE c VOLATILE PARALLEL SAFE
	AS 'MODULE_PATHNAME', 'orch_uuid_v7';

-- A task's lease token: UUID version 8, its step's id in the last 62 bits
-- and 60 random bits (src/uuid_v7.c).
CREATE FUNCTION orch._lease_token(step_id bigint) RETURNS uuid
	LANGUAGE c VOLATILE STRICT PARALLEL SAFE
	AS 'MODULE_PATHNAME', 'orch_lease_token';
CREATE FUNCTION orch._lease_step(token uuid) RETURNS bigint
	LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
	AS 'MODULE_PATHNAME', 'orch_lease_step';

CREATE TABLE orch.runs (
	run_id			uuid		PRIMARY KEY DEFAULT orch._uuid_v7(),
	workflow		text		NOT NULL,
	version			int			NOT NULL,
	status			orch.run_status NOT NULL DEFAULT 'pending',
	input			jsonb		NOT NULL DEFAULT '{}',
	output			jsonb,
	error			jsonb,
	owner			name		NOT NULL,
	business_key	text,
	idempotency_key	text,
	trace_id		orch.trace_id NOT NULL,
	tenant			text,
	priority		int			NOT NULL DEFAULT 0,
	deadline		timestamptz,
	steps_left		orch.counter NOT NULL,
	paused_from		orch.run_status,
	reason			text,
	parent_run_id	uuid,		-- the run whose subworkflow or map step started this one
	parent_step_id	bigint,
	parent_attempt	int,		-- that step's attempt
	parent_item		int,		-- a map step's: the index of the item this run is for
	created_at		timestamptz	NOT NULL DEFAULT pg_catalog.now(),
	started_at		timestamptz,
	finished_at		timestamptz,
	FOREIGN KEY (workflow, version) REFERENCES orch.workflows
);
CREATE UNIQUE INDEX runs_idempotency_key ON orch.runs (workflow, idempotency_key)
	WHERE idempotency_key IS NOT NULL;
CREATE INDEX runs_active ON orch.runs (created_at)
	WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out');
CREATE INDEX runs_business_key ON orch.runs (business_key) WHERE business_key IS NOT NULL;
-- The child runs of subworkflow steps, by parent step and by parent run.
CREATE INDEX runs_parent_step ON orch.runs (parent_step_id) WHERE parent_step_id IS NOT NULL;
CREATE INDEX runs_parent_run ON orch.runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
-- The engine's deadline timers.
CREATE INDEX runs_deadline ON orch.runs (deadline)
	WHERE deadline IS NOT NULL AND status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out');

/*
 * Steps.  `pending_needs` counts the needs not yet finished, `needs_ok` the
 * needs that succeeded (a step all of whose needs were skipped is skipped).
 * `wake_at` is when the engine should next look at the step: the moment it
 * became ready, the end of a sleep, the next retry; 'infinity' while its run
 * is paused.  The partial index below is the engine's whole work queue.
 *
 * No foreign key to orch.runs: start_run inserts a run's steps right after
 * the run, and the check (a query per step) would only slow that down, or
 * worse, with a plan cached while orch.runs looked empty.
 */
CREATE TABLE orch.steps (
	step_id			bigint		GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	run_id			uuid		NOT NULL,
	name			text		NOT NULL,
	status			orch.step_status NOT NULL,
	pending_needs	orch.counter NOT NULL DEFAULT 0,
	needs_ok		int			NOT NULL DEFAULT 0,
	attempt			int			NOT NULL DEFAULT 0,
	attempt_base	int			NOT NULL DEFAULT 0,	-- attempts before the last redrive
	wake_at			timestamptz,
	output			jsonb,
	error			jsonb,
	started_at		timestamptz,
	finished_at		timestamptz,
	circuit			text,
	-- task steps: the queue, and the current lease of an external worker
	queue			text,
	priority		int			NOT NULL DEFAULT 0,	-- the run's
	lease_token		uuid,
	lease			interval,
	worker			text,
	attempt_started_at timestamptz,
	progress		jsonb,
	-- what the engine does when the step comes due: NULL run it, 'verify'
	-- decide an unknown outcome, 'compensate' undo it
	phase			text,
	cause			jsonb,		-- the error that routed the run to this step
	compensations	int			NOT NULL DEFAULT 0,	-- tries of its compensation
	-- how a human resolved the step after needs_human (orch.resolve):
	-- {"action", "data", "by", "at", "reason"}
	resolution		jsonb,
	UNIQUE (run_id, name)
);
-- The engine's work queue: due steps, and leases of running tasks (wake_at
-- is the lease's expiry).
CREATE INDEX steps_due ON orch.steps (wake_at, step_id)
	WHERE status IN ('ready', 'waiting', 'retrying', 'running', 'blocked', 'needs_approval');
-- The external workers' queues: tasks waiting for a worker.
-- In claim order: higher priority first, then in step order.  The priority is
-- negated (as bigint, which holds the negation of every int) so that every
-- column ascends, and a claim can resume after a task with a row comparison.
-- Pages filled to a tenth: a scan of a btree index checks every entry from
-- where it starts to the end of the page at once, and a claim takes the
-- first task or the first ten; full pages (about 250 entries) cost a
-- single-task claim about 130,000 instructions there, against 70,000 now.
-- The fill factor holds where tasks are queued at the index's right edge
-- (the last queue and priority in index order: tasks of one queue and
-- priority come in step order) and for pages a REINDEX builds; other pages
-- split in halves.  A backlog takes ten times the pages (100,000 waiting
-- tasks: about 4,000 pages, 32 MB).
CREATE INDEX steps_task_queue ON orch.steps (queue, (- priority::bigint), step_id)
	WITH (fillfactor = 10)
	WHERE status = 'waiting' AND queue IS NOT NULL;
-- Leased tasks per queue, for concurrency limits.
CREATE INDEX steps_task_running ON orch.steps (queue)
	WHERE status = 'running' AND queue IS NOT NULL;
-- No index of lease tokens: a token names its step (orch._lease_step), which
-- a verdict finds by its primary key.
-- Steps waiting for their circuit to close.
CREATE INDEX steps_blocked ON orch.steps (circuit) WHERE status = 'blocked';
-- The human queue.
CREATE INDEX steps_needs_human ON orch.steps (step_id) WHERE status = 'needs_human';

-- One row per try of a step.  Written only by the engine, in the transaction
-- that updates the step, so no foreign key (whose check would be a query per
-- attempt on the engine's hot path).
CREATE TABLE orch.attempts (
	step_id		bigint		NOT NULL,
	attempt		int			NOT NULL,
	-- run: a try of the step; verify: the verification of attempt `attempt`'s
	-- unknown outcome; compensate: try `attempt` of undoing the step
	kind		orch.attempt_kind NOT NULL DEFAULT 'run',
	run_id		uuid		NOT NULL,
	worker		text		NOT NULL,
	started_at	timestamptz	NOT NULL,
	finished_at	timestamptz	NOT NULL,
	outcome		orch.attempt_outcome NOT NULL,
	error_class	text,
	sqlstate	text,
	message		text,
	detail		text,
	hint		text,
	context		text,
	PRIMARY KEY (step_id, attempt, kind)
);
CREATE INDEX attempts_run ON orch.attempts (run_id);

/*
 * Events sent to runs (orch.send_event).  An event is kept until a
 * wait_event step of its run that waits for that name takes it, the first
 * sent first; one sent before the run reaches its wait is waiting for it
 * there.  consumed_by is the step that took it.
 */
CREATE TABLE orch.events (
	event_id		bigint		GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	run_id			uuid		NOT NULL,
	name			text		NOT NULL,
	payload			jsonb		NOT NULL,
	sent_at			timestamptz	NOT NULL DEFAULT pg_catalog.now(),
	sent_by			text		NOT NULL,
	consumed_by		bigint,
	consumed_at		timestamptz
);
-- The events not yet taken, in the order they are taken.
CREATE INDEX events_pending ON orch.events (run_id, name, event_id) WHERE consumed_by IS NULL;

/*
 * Approval requests of approval steps.  What the approvers see is fixed
 * when the request is made: the payload (what will change), the target and
 * the evidence, bound together by payload_hash (SHA-256 of the three as a
 * jsonb array's text).  A request is pending until quorum distinct members
 * of the approvers role approve (approved) or one rejects (rejected), or it
 * expires (expired), goes to another role (escalated: a new request
 * continues it), or the step asks again about a changed payload
 * (superseded).
 */
CREATE TABLE orch.approvals (
	approval_id		bigint		GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	step_id			bigint		NOT NULL,
	run_id			uuid		NOT NULL,
	approvers		text		NOT NULL,
	quorum			int			NOT NULL CHECK (quorum > 0),
	allow_self		boolean		NOT NULL,
	payload			jsonb,
	target			jsonb,
	evidence		jsonb,
	payload_hash	bytea		NOT NULL,
	status			text		NOT NULL DEFAULT 'pending'
		CHECK (status IN ('pending', 'approved', 'rejected', 'expired', 'escalated', 'superseded')),
	requested_at	timestamptz	NOT NULL DEFAULT pg_catalog.now(),
	expires_at		timestamptz,
	decided_at		timestamptz,
	escalated_from	bigint		REFERENCES orch.approvals
);
CREATE INDEX approvals_step ON orch.approvals (step_id, approval_id);
CREATE INDEX approvals_pending ON orch.approvals (approval_id) WHERE status = 'pending';

-- The votes on approval requests: one per person and request.
CREATE TABLE orch.approval_votes (
	approval_id		bigint		NOT NULL REFERENCES orch.approvals,
	voter			text		NOT NULL,
	decision		text		NOT NULL CHECK (decision IN ('approve', 'reject')),
	comment			text,
	self_approval	boolean		NOT NULL DEFAULT false,	-- the run's owner, as the gate allowed
	session_role	text		NOT NULL,	-- session_user, for the record
	voted_at		timestamptz	NOT NULL DEFAULT pg_catalog.now(),
	PRIMARY KEY (approval_id, voter)
);

SELECT pg_catalog.pg_extension_config_dump('orch.workflows', '');
SELECT pg_catalog.pg_extension_config_dump('orch.retry_policies', '');
SELECT pg_catalog.pg_extension_config_dump('orch.circuits', '');
SELECT pg_catalog.pg_extension_config_dump('orch.queues', '');
SELECT pg_catalog.pg_extension_config_dump('orch.workflow_steps', '');
SELECT pg_catalog.pg_extension_config_dump('orch.runs', '');
SELECT pg_catalog.pg_extension_config_dump('orch.steps', '');
SELECT pg_catalog.pg_extension_config_dump('orch.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('orch.events', '');
SELECT pg_catalog.pg_extension_config_dump('orch.approvals', '');
SELECT pg_catalog.pg_extension_config_dump('orch.approval_votes', '');

/* ------------------------------------------------------------------------
 * Internal C functions
 * ------------------------------------------------------------------------ */

-- Wake this database's engine workers when the current transaction ends.
CREATE FUNCTION orch._wake_at_end() RETURNS void
	LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'orch_wake_at_end';

-- Tell the launcher to look for this database when the current transaction commits.
CREATE FUNCTION orch._launcher_wake_on_commit() RETURNS void
	LANGUAGE c VOLATILE STRICT AS 'MODULE_PATHNAME', 'orch_launcher_wake_on_commit';

/* ------------------------------------------------------------------------
 * Internal helpers
 * ------------------------------------------------------------------------ */

/*
 * The role that called into the extension.  Inside a SECURITY DEFINER
 * function current_user is the extension's owner, so the caller is read from
 * the role setting (SET ROLE), falling back to the session user.
 */
CREATE FUNCTION orch._caller() RETURNS name
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE WHEN pg_catalog.current_setting('role') = 'none'
				THEN session_user
				ELSE pg_catalog.current_setting('role')::name END
$$;

-- object is what is being defined, as the message names it: workflow "x".
CREATE FUNCTION orch._definition_error(code text, object text, path text, msg text,
									   detail text DEFAULT NULL, hint text DEFAULT NULL)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	RAISE EXCEPTION USING
		ERRCODE = code,
		MESSAGE = format('invalid definition of %s at %s: %s', object, path, msg),
		DETAIL = coalesce(detail, ''),
		HINT = coalesce(hint, '');
END
$$;

-- A duration: an ISO 8601 or PostgreSQL interval string, positive.
CREATE FUNCTION orch._duration(val jsonb, workflow text, path text) RETURNS interval
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	d interval;
BEGIN
	IF jsonb_typeof(val) IS DISTINCT FROM 'string' THEN
		PERFORM orch._definition_error('22023', workflow, path,
			format('expected a duration string, got %s', coalesce(jsonb_typeof(val), 'nothing')),
			hint => 'Write durations as strings such as "30s", "5 minutes" or "PT1M".');
	END IF;
	BEGIN
		d := orch._parse_duration(val #>> '{}');
	EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow
				OR interval_field_overflow OR invalid_parameter_value THEN
		PERFORM orch._definition_error('22007', workflow, path,
			format('invalid duration "%s"', val #>> '{}'),
			hint => 'Write durations as strings such as "30s", "5 minutes" or "PT1M".');
	END;
	IF d <= interval '0' THEN
		PERFORM orch._definition_error('22023', workflow, path,
			format('duration "%s" is not positive', val #>> '{}'));
	END IF;
	RETURN d;
END
$$;

-- "30s", "250ms", "5m", "2h", "1d" as well as anything interval_in accepts.
CREATE FUNCTION orch._parse_duration(s text) RETURNS interval
	LANGUAGE plpgsql IMMUTABLE STRICT
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	m text[];
BEGIN
	m := regexp_match(s, '^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$');
	IF m IS NOT NULL THEN
		RETURN m[1]::numeric * CASE m[2]
			WHEN 'ms' THEN interval '1 millisecond'
			WHEN 's' THEN interval '1 second'
			WHEN 'm' THEN interval '1 minute'
			WHEN 'h' THEN interval '1 hour'
			ELSE interval '1 day' END;
	END IF;
	IF s !~ '[0-9]' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_datetime_format', MESSAGE = 'no number';
	END IF;
	RETURN s::interval;
END
$$;

-- Does a retry policy or an on_error rule name errors with this: an error
-- class, or a SQLSTATE?
CREATE FUNCTION orch._is_error_name(name text) RETURNS boolean
	LANGUAGE sql IMMUTABLE STRICT
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT $1 IN ('transient', 'permanent', 'unknown_outcome') OR $1 ~ '^[0-9A-Z]{5}$'
$$;

CREATE FUNCTION orch._check_keys(obj jsonb, allowed text[], workflow text, path text, what text)
	RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	k text;
BEGIN
	FOR k IN SELECT jsonb_object_keys(obj) ORDER BY 1 LOOP
		IF NOT k = ANY (allowed) THEN
			PERFORM orch._definition_error('22023', workflow, path,
				format('unknown key "%s"', k),
				format('Allowed keys for %s are: %s.', what, array_to_string(allowed, ', ')));
		END IF;
	END LOOP;
END
$$;

/*
 * A retry policy, validated and completed with the defaults of Temporal's
 * RetryPolicy: given inline (an object), by name (a string: a policy of
 * orch.define_retry_policy, copied as it is now), or absent (the defaults).
 */
CREATE FUNCTION orch._compile_retry(retry jsonb, obj text, path text) RETURNS jsonb
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
	-- durations in the result read the same whatever the session's IntervalStyle
	SET IntervalStyle = 'iso_8601'
AS $$
DECLARE
	j			int;
	v_max_att	int := 3;
	v_init		interval := interval '1 second';
	v_coef		float8 := 2.0;
	v_maxint	interval;
	v_jitter	boolean := false;
	v_nonretry	jsonb;
	v_stc		interval;
	named		jsonb;
BEGIN
	IF retry IS NULL THEN
		-- the defaults
		NULL;
	ELSIF jsonb_typeof(retry) = 'string' THEN
		SELECT p.policy INTO named FROM orch.retry_policies p WHERE p.name = retry #>> '{}';
		IF NOT FOUND THEN
			PERFORM orch._definition_error('42704', obj, path,
				format('retry policy "%s" does not exist', retry #>> '{}'),
				hint => 'Define it with orch.define_retry_policy(name, policy), or give the policy inline.');
		END IF;
		RETURN named || jsonb_build_object('policy', retry #>> '{}');
	ELSIF jsonb_typeof(retry) <> 'object' THEN
		PERFORM orch._definition_error('22023', obj, path,
			'expected a retry policy object or the name of one');
	ELSE
		PERFORM orch._check_keys(retry,
			ARRAY['max_attempts', 'initial_interval', 'backoff_coefficient',
				  'max_interval', 'jitter', 'non_retryable', 'schedule_to_close'],
			obj, path, 'a retry policy');
		IF retry ? 'max_attempts' THEN
			IF jsonb_typeof(retry -> 'max_attempts') <> 'number'
			   OR (retry ->> 'max_attempts')::numeric <> trunc((retry ->> 'max_attempts')::numeric)
			   OR (retry ->> 'max_attempts')::numeric NOT BETWEEN 0 AND 1000000 THEN
				PERFORM orch._definition_error('22023', obj, path || '.max_attempts',
					format('expected an integer from 0 to 1000000, got %s', retry -> 'max_attempts'),
					hint => '0 means unlimited attempts.');
			END IF;
			v_max_att := (retry ->> 'max_attempts')::int;
		END IF;
		IF retry ? 'initial_interval' THEN
			v_init := orch._duration(retry -> 'initial_interval', obj, path || '.initial_interval');
		END IF;
		IF retry ? 'backoff_coefficient' THEN
			IF jsonb_typeof(retry -> 'backoff_coefficient') <> 'number'
			   OR (retry ->> 'backoff_coefficient')::numeric < 1
			   OR (retry ->> 'backoff_coefficient')::numeric > 100 THEN
				PERFORM orch._definition_error('22023', obj, path || '.backoff_coefficient',
					format('expected a number from 1 to 100, got %s', retry -> 'backoff_coefficient'));
			END IF;
			v_coef := (retry ->> 'backoff_coefficient')::float8;
		END IF;
		IF retry ? 'max_interval' THEN
			v_maxint := orch._duration(retry -> 'max_interval', obj, path || '.max_interval');
			IF v_maxint < v_init THEN
				PERFORM orch._definition_error('22023', obj, path || '.max_interval',
					format('max_interval %s is shorter than initial_interval %s',
						   retry -> 'max_interval', coalesce(retry -> 'initial_interval', '"1s"')));
			END IF;
		END IF;
		IF retry ? 'jitter' THEN
			IF (retry -> 'jitter') NOT IN ('"none"'::jsonb, '"full"'::jsonb) THEN
				PERFORM orch._definition_error('22023', obj, path || '.jitter',
					format('expected "none" or "full", got %s', retry -> 'jitter'));
			END IF;
			v_jitter := (retry ->> 'jitter') = 'full';
		END IF;
		IF retry ? 'non_retryable' THEN
			IF jsonb_typeof(retry -> 'non_retryable') <> 'array'
			   OR EXISTS (SELECT FROM jsonb_array_elements(retry -> 'non_retryable') e
						  WHERE jsonb_typeof(e) <> 'string') THEN
				PERFORM orch._definition_error('22023', obj, path || '.non_retryable',
					'expected an array of error classes or SQLSTATE codes');
			END IF;
			FOR j IN 0 .. jsonb_array_length(retry -> 'non_retryable') - 1 LOOP
				IF NOT orch._is_error_name(retry -> 'non_retryable' ->> j) THEN
					PERFORM orch._definition_error('22023', obj,
						format('%s.non_retryable[%s]', path, j),
						format('"%s" is neither an error class nor a SQLSTATE', retry -> 'non_retryable' ->> j),
						hint => 'Error classes are transient, permanent and unknown_outcome; a SQLSTATE is five digits or capital letters, such as 23505.');
				END IF;
			END LOOP;
			v_nonretry := retry -> 'non_retryable';
		END IF;
		IF retry ? 'schedule_to_close' THEN
			v_stc := orch._duration(retry -> 'schedule_to_close', obj, path || '.schedule_to_close');
		END IF;
	END IF;
	RETURN jsonb_build_object(
		'max_attempts', v_max_att,
		'initial_interval', v_init,
		'backoff_coefficient', v_coef,
		'max_interval', coalesce(v_maxint, v_init * 100),
		'jitter', v_jitter,
		'non_retryable', v_nonretry,
		'schedule_to_close', v_stc);
END
$$;

/* ------------------------------------------------------------------------
 * Definitions
 * ------------------------------------------------------------------------ */

/*
 * Validate a workflow definition completely and store it as a new version
 * (or return the current version when the definition is unchanged).
 */
/*
 * A function a step calls, fn(ctx jsonb) returns jsonb, named by a
 * schema-qualified string at path.  of: whose function it is ('step "x"');
 * what: what calls it, for the hints ('A sql step').
 */
CREATE FUNCTION orch._step_function(val jsonb, obj text, path text, of text, what text)
	RETURNS regprocedure
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	fn_text	text := val #>> '{}';
	proc	regprocedure;
	rec		record;
BEGIN
	IF jsonb_typeof(val) IS DISTINCT FROM 'string' THEN
		PERFORM orch._definition_error('22023', obj, path,
			format('expected a function name, got %s', coalesce(jsonb_typeof(val), 'nothing')),
			hint => format('%s calls schema.fn(ctx jsonb) returns jsonb.', what));
	END IF;
	IF fn_text !~ '^\s*("[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)\s*\.\s*("[^"]+"|[A-Za-z_][A-Za-z0-9_$]*)\s*$' THEN
		PERFORM orch._definition_error('22023', obj, path,
			format('function name "%s" of %s is not schema-qualified', fn_text, of),
			hint => 'Write the function as schema.name, for example app.classify_ticket.');
	END IF;
	proc := to_regprocedure(fn_text || '(jsonb)');
	IF proc IS NULL THEN
		IF to_regproc(fn_text) IS NOT NULL
		   OR EXISTS (SELECT FROM pg_proc p
					  WHERE p.oid::regproc::text = fn_text
						 OR (p.pronamespace::regnamespace::text || '.' || p.proname) = fn_text) THEN
			PERFORM orch._definition_error('42804', obj, path,
				format('function %s of %s does not take a single jsonb argument', fn_text, of),
				hint => format('%s calls fn(ctx jsonb) returns jsonb.', what));
		END IF;
		PERFORM orch._definition_error('42883', obj, path,
			format('function %s(jsonb) of %s does not exist', fn_text, of),
			hint => 'Create the function before defining the workflow.');
	END IF;
	SELECT p.prorettype, p.proretset, p.prokind INTO rec FROM pg_proc p WHERE p.oid = proc;
	IF rec.prokind <> 'f' THEN
		PERFORM orch._definition_error('42804', obj, path,
			format('%s of %s is not a plain function', proc, of),
			hint => format('%s calls fn(ctx jsonb) returns jsonb; procedures and aggregates cannot be called.', what));
	END IF;
	IF rec.prorettype <> 'jsonb'::regtype OR rec.proretset THEN
		PERFORM orch._definition_error('42804', obj, path,
			format('function %s of %s returns %s%s, not jsonb', proc, of,
				   CASE WHEN rec.proretset THEN 'setof ' ELSE '' END, rec.prorettype::regtype),
			hint => format('%s calls fn(ctx jsonb) returns jsonb.', what));
	END IF;
	RETURN proc;
END
$$;

/*
 * on_error: a non-empty array of rules {"errors": [...], "goto": "step"} or
 * {"errors": [...], "human": true}.  errors lists error classes or SQLSTATEs;
 * without it a rule matches every error.  Returns the rules normalized
 * (errors always present, or null).
 */
CREATE FUNCTION orch._compile_on_error(val jsonb, names text[], sname text, obj text, path text)
	RETURNS jsonb
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	rule	jsonb;
	e		jsonb;
	i		int;
	j		int;
	rpath	text;
	target	text;
	result	jsonb := '[]';
BEGIN
	IF jsonb_typeof(val) IS DISTINCT FROM 'array' OR jsonb_array_length(val) = 0 THEN
		PERFORM orch._definition_error('22023', obj, path, 'expected a non-empty array of rules',
			hint => 'A rule is {"errors": ["permanent"], "goto": "step"} or {"errors": ["permanent"], "human": true}; errors name error classes or SQLSTATEs.');
	END IF;
	FOR i IN 0 .. jsonb_array_length(val) - 1 LOOP
		rule := val -> i;
		rpath := format('%s[%s]', path, i);
		IF jsonb_typeof(rule) <> 'object' THEN
			PERFORM orch._definition_error('22023', obj, rpath,
				format('expected a rule object, got %s', jsonb_typeof(rule)),
				hint => 'A rule is {"errors": ["permanent"], "goto": "step"}.');
		END IF;
		PERFORM orch._check_keys(rule, ARRAY['errors', 'goto', 'human'], obj, rpath, 'an on_error rule');
		IF rule ? 'goto' AND rule ? 'human' THEN
			PERFORM orch._definition_error('22023', obj, rpath,
				'a rule either goes to a step ("goto") or to a human ("human"), not both');
		END IF;
		IF rule ? 'human' THEN
			IF rule -> 'human' IS DISTINCT FROM 'true'::jsonb THEN
				PERFORM orch._definition_error('22023', obj, rpath || '.human',
					format('expected true, got %s', rule -> 'human'),
					hint => '"human": true sends the step to the human queue (orch.human_queue) instead of failing the run.');
			END IF;
		ELSIF jsonb_typeof(rule -> 'goto') IS DISTINCT FROM 'string' THEN
			PERFORM orch._definition_error('22023', obj, rpath || '.goto',
				'every rule needs a "goto" step name, or "human": true');
		END IF;
		target := rule ->> 'goto';
		IF target IS NULL THEN
			NULL;	-- to the human queue
		ELSIF NOT target = ANY (names) THEN
			PERFORM orch._definition_error('22023', obj, rpath || '.goto',
				format('on_error of step "%s" goes to unknown step "%s"', sname, target),
				format('Steps defined: %s.', array_to_string(names, ', ')));
		END IF;
		IF target = sname THEN
			PERFORM orch._definition_error('22023', obj, rpath || '.goto',
				format('on_error of step "%s" goes to the step itself', sname),
				hint => 'Retries are the retry policy''s business; on_error goes to another step.');
		END IF;
		IF rule ? 'errors' THEN
			IF jsonb_typeof(rule -> 'errors') <> 'array' OR jsonb_array_length(rule -> 'errors') = 0 THEN
				PERFORM orch._definition_error('22023', obj, rpath || '.errors',
					'expected a non-empty array of error classes or SQLSTATEs',
					hint => 'Leave "errors" out to match every error.');
			END IF;
			FOR j IN 0 .. jsonb_array_length(rule -> 'errors') - 1 LOOP
				e := rule -> 'errors' -> j;
				IF jsonb_typeof(e) <> 'string'
				   OR NOT orch._is_error_name(e #>> '{}') THEN
					PERFORM orch._definition_error('22023', obj, format('%s.errors[%s]', rpath, j),
						format('%s is neither an error class nor a SQLSTATE', e),
						hint => 'Error classes are transient, permanent and unknown_outcome; a SQLSTATE has five digits or capital letters, such as 23505.');
				END IF;
			END LOOP;
		END IF;
		result := result || jsonb_build_array(
			CASE WHEN target IS NULL THEN jsonb_build_object('errors', rule -> 'errors', 'human', true)
				 ELSE jsonb_build_object('errors', rule -> 'errors', 'goto', target) END);
	END LOOP;
	RETURN result;
END
$$;

CREATE FUNCTION orch.define_workflow(name text, definition jsonb) RETURNS int
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	wf			text := define_workflow.name;
	def			jsonb := define_workflow.definition;
	steps		jsonb;
	step		jsonb;
	i			int;
	j			int;
	path		text;
	sname		text;
	kind		text;
	names		text[] := '{}';
	needs		text[][];
	need		jsonb;
	need_names	text[];
	proc		regprocedure;
	fn_text		text;
	rec			record;
	v_version	int;
	-- compiled rows, one array per column, indexed like names
	c_kind		text[] := '{}';
	c_needs		jsonb[] := '{}';
	c_guard		jsonpath[] := '{}';
	c_fname		text[] := '{}';
	c_fn		regprocedure[] := '{}';
	c_sleep_for	interval[] := '{}';
	c_sleep_until jsonpath[] := '{}';
	c_max_att	int[] := '{}';
	c_init		interval[] := '{}';
	c_coef		float8[] := '{}';
	c_maxint	interval[] := '{}';
	c_jitter	boolean[] := '{}';
	c_timeout	interval[] := '{}';
	c_nonretry	jsonb[] := '{}';
	v_nonretry	jsonb;
	v_guard		jsonpath;
	v_until		jsonpath;
	v_for		interval;
	v_max_att	int;
	v_init		interval;
	v_coef		float8;
	v_maxint	interval;
	v_jitter	boolean;
	v_timeout	interval;
	v_retry		jsonb;
	v_stc		interval;
	v_queue		text;
	c_queue		text[] := '{}';
	v_sts		interval;
	v_hbt		interval;
	c_sts		interval[] := '{}';
	c_hbt		interval[] := '{}';
	c_stc		interval[] := '{}';
	c_policy	text[] := '{}';
	obj			text;
	common_keys	text[] := ARRAY['name', 'kind', 'needs', 'when', 'description', 'retry', 'timeout',
								'circuit', 'on_error'];
	v_verify	regprocedure;
	v_comp		regprocedure;
	v_idem		boolean;
	v_on_error	jsonb;
	c_verify	regprocedure[] := '{}';
	c_comp		regprocedure[] := '{}';
	c_idem		boolean[] := '{}';
	c_on_error	jsonb[] := '{}';
	c_target	boolean[];
	c_explicit	boolean[] := '{}';
	v_circuit	text;
	c_circuit	text[] := '{}';
	v_event		text;
	v_on_timeout text;
	c_event		text[] := '{}';
	c_on_timeout text[] := '{}';
	v_in_schema	jsonb;
	v_out_schema jsonb;
	v_review	jsonpath;
	c_in_schema	jsonb[] := '{}';
	c_out_schema jsonb[] := '{}';
	c_review	jsonpath[] := '{}';
	v_problem	text[];
	schema_key	text;
	v_approvers	text;
	v_quorum	int;
	v_self		boolean;
	v_paths		jsonpath[];
	v_escalate	text;
	c_approvers	text[] := '{}';
	c_quorum	int[] := '{}';
	c_self		boolean[] := '{}';
	c_apayload	jsonpath[] := '{}';
	c_atarget	jsonpath[] := '{}';
	c_aevidence	jsonpath[] := '{}';
	c_escalate	text[] := '{}';
	akey		text;
	v_sub		text;
	v_sub_input	jsonpath;
	c_sub		text[] := '{}';
	c_sub_input	jsonpath[] := '{}';
	v_items		jsonpath;
	v_maxconc	int;
	v_tol		int;
	v_tolpct	numeric;
	c_items		jsonpath[] := '{}';
	c_maxconc	int[] := '{}';
	c_tol		int[] := '{}';
	c_tolpct	numeric[] := '{}';
	-- cycle detection
	indeg		int[];
	queue		int[];
	done_count	int := 0;
	cur			int;
	cycle		text[];
BEGIN
	IF wf IS NULL OR wf !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('invalid workflow name "%s"', coalesce(wf, 'NULL')),
			HINT = 'A workflow name starts with a letter or underscore and has at most 63 letters, digits, underscores, dots or hyphens.';
	END IF;
	obj := format('workflow "%s"', wf);
	IF def IS NULL OR jsonb_typeof(def) <> 'object' THEN
		PERFORM orch._definition_error('22023', obj, '$',
			format('expected an object, got %s', coalesce(jsonb_typeof(def), 'NULL')),
			hint => 'A definition is an object with a "steps" array.');
	END IF;
	PERFORM orch._check_keys(def, ARRAY['steps', 'description'], obj, '$', 'a workflow definition');
	steps := def -> 'steps';
	IF steps IS NULL THEN
		PERFORM orch._definition_error('22023', obj, '$', 'missing key "steps"',
			hint => 'A definition is an object with a "steps" array.');
	END IF;
	IF jsonb_typeof(steps) <> 'array' OR jsonb_array_length(steps) = 0 THEN
		PERFORM orch._definition_error('22023', obj, '$.steps', 'expected a non-empty array of steps');
	END IF;
	IF def ? 'description' AND jsonb_typeof(def -> 'description') <> 'string' THEN
		PERFORM orch._definition_error('22023', obj, '$.description', 'expected a string');
	END IF;

	-- First pass: names, so that needs may refer to any step.
	FOR i IN 0 .. jsonb_array_length(steps) - 1 LOOP
		step := steps -> i;
		path := format('$.steps[%s]', i);
		IF jsonb_typeof(step) <> 'object' THEN
			PERFORM orch._definition_error('22023', obj, path,
				format('expected a step object, got %s', jsonb_typeof(step)));
		END IF;
		IF jsonb_typeof(step -> 'name') IS DISTINCT FROM 'string' THEN
			PERFORM orch._definition_error('22023', obj, path || '.name',
				'every step needs a "name" string');
		END IF;
		sname := step ->> 'name';
		IF sname !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' THEN
			PERFORM orch._definition_error('22023', obj, path || '.name',
				format('invalid step name "%s"', sname),
				hint => 'A step name starts with a letter or underscore and has at most 63 letters, digits or underscores, so that $.steps.<name> reaches its output.');
		END IF;
		IF sname = ANY (names) THEN
			PERFORM orch._definition_error('22023', obj, path || '.name',
				format('duplicate step name "%s"', sname),
				format('Step "%s" is also defined at $.steps[%s].', sname, array_position(names, sname) - 1));
		END IF;
		names := names || sname;
	END LOOP;

	-- Second pass: each step in full.
	FOR i IN 0 .. jsonb_array_length(steps) - 1 LOOP
		step := steps -> i;
		path := format('$.steps[%s]', i);
		sname := step ->> 'name';
		IF jsonb_typeof(step -> 'kind') IS DISTINCT FROM 'string' THEN
			PERFORM orch._definition_error('22023', obj, path || '.kind',
				format('step "%s" needs a "kind" string', sname),
				hint => 'Kinds are: sql, sleep, task, wait_event, approval, subworkflow, map.');
		END IF;
		kind := step ->> 'kind';
		IF kind NOT IN ('sql', 'sleep', 'task', 'wait_event', 'approval', 'subworkflow', 'map') THEN
			PERFORM orch._definition_error('22023', obj, path || '.kind',
				format('unknown step kind "%s"', kind),
				hint => 'Kinds are: sql, sleep, task, wait_event, approval, subworkflow, map.');
		END IF;
		PERFORM orch._check_keys(step,
			common_keys || CASE kind WHEN 'sql' THEN ARRAY['function', 'verify', 'compensate',
															'input_schema', 'output_schema', 'review_if']
									 WHEN 'task' THEN ARRAY['queue', 'schedule_to_start', 'heartbeat_timeout',
															'idempotent', 'verify', 'compensate',
															'input_schema', 'output_schema', 'review_if']
									 WHEN 'wait_event' THEN ARRAY['event', 'on_timeout', 'output_schema',
																  'review_if']
									 WHEN 'approval' THEN ARRAY['approvers', 'quorum', 'allow_self_approval',
																'payload', 'target', 'evidence',
																'on_timeout', 'on_reject']
									 WHEN 'subworkflow' THEN ARRAY['workflow', 'input']
									 WHEN 'map' THEN ARRAY['workflow', 'items', 'max_concurrency',
														   'tolerated_failures']
									 ELSE ARRAY['duration', 'until'] END,
			obj, path, format('a step of kind "%s"', kind));

		-- needs
		need_names := '{}';
		IF step ? 'needs' THEN
			IF jsonb_typeof(step -> 'needs') <> 'array' THEN
				PERFORM orch._definition_error('22023', obj, path || '.needs',
					'expected an array of step names');
			END IF;
			FOR j IN 0 .. jsonb_array_length(step -> 'needs') - 1 LOOP
				need := step -> 'needs' -> j;
				IF jsonb_typeof(need) <> 'string' THEN
					PERFORM orch._definition_error('22023', obj, format('%s.needs[%s]', path, j),
						'expected a step name');
				END IF;
				IF NOT (need #>> '{}') = ANY (names) THEN
					PERFORM orch._definition_error('22023', obj, format('%s.needs[%s]', path, j),
						format('step "%s" needs unknown step "%s"', sname, need #>> '{}'),
						format('Steps defined: %s.', array_to_string(names, ', ')));
				END IF;
				IF (need #>> '{}') = sname THEN
					PERFORM orch._definition_error('22023', obj, format('%s.needs[%s]', path, j),
						format('step "%s" needs itself', sname));
				END IF;
				IF (need #>> '{}') = ANY (need_names) THEN
					PERFORM orch._definition_error('22023', obj, format('%s.needs[%s]', path, j),
						format('step "%s" lists need "%s" twice', sname, need #>> '{}'));
				END IF;
				need_names := need_names || (need #>> '{}');
			END LOOP;
		END IF;

		-- when
		v_guard := NULL;
		IF step ? 'when' THEN
			IF jsonb_typeof(step -> 'when') <> 'string' THEN
				PERFORM orch._definition_error('22023', obj, path || '.when',
					'expected a jsonpath predicate string');
			END IF;
			BEGIN
				v_guard := (step ->> 'when')::jsonpath;
			EXCEPTION WHEN OTHERS THEN
				PERFORM orch._definition_error('42601', obj, path || '.when',
					format('invalid jsonpath in "when" of step "%s"', sname),
					SQLERRM,
					'A guard is a SQL/JSON path predicate over the run context, such as $.steps.classify.kind == "refund".');
			END;
		END IF;

		-- function
		proc := NULL;
		fn_text := NULL;
		IF kind = 'sql' THEN
			IF jsonb_typeof(step -> 'function') IS DISTINCT FROM 'string' THEN
				PERFORM orch._definition_error('22023', obj, path || '.function',
					format('sql step "%s" needs a "function" string', sname),
					hint => 'Name a function schema.fn(ctx jsonb) returns jsonb.');
			END IF;
			fn_text := step ->> 'function';
			proc := orch._step_function(step -> 'function', obj, path || '.function',
										format('step "%s"', sname), 'A sql step');
		END IF;

		-- verify: decides what an unknown outcome was; compensate: undoes the step
		v_verify := NULL;
		v_comp := NULL;
		IF step ? 'verify' THEN
			v_verify := orch._step_function(step -> 'verify', obj, path || '.verify',
											format('"verify" of step "%s"', sname), 'The engine');
		END IF;
		IF step ? 'compensate' THEN
			v_comp := orch._step_function(step -> 'compensate', obj, path || '.compensate',
										  format('"compensate" of step "%s"', sname), 'The engine');
		END IF;

		-- idempotent: a task whose worker may be asked to do it twice
		v_idem := false;
		IF step ? 'idempotent' THEN
			IF jsonb_typeof(step -> 'idempotent') <> 'boolean' THEN
				PERFORM orch._definition_error('22023', obj, path || '.idempotent',
					'expected true or false',
					hint => 'true tells the engine that a lost lease may be retried: the worker makes doing the task twice harmless, e.g. with the idempotency key.');
			END IF;
			v_idem := (step -> 'idempotent')::boolean;
		END IF;

		-- on_error: routes to other steps, tried in order
		v_on_error := NULL;
		IF step ? 'on_error' THEN
			v_on_error := orch._compile_on_error(step -> 'on_error', names, sname, obj, path || '.on_error');
		END IF;
		-- on_reject of an approval: fail (the default), or a step to go on at,
		-- which is an on_error rule for the rejection's SQLSTATE, tried first
		IF kind = 'approval' AND step ? 'on_reject' AND step -> 'on_reject' <> '"fail"'::jsonb THEN
			IF jsonb_typeof(step -> 'on_reject') <> 'object' OR NOT (step -> 'on_reject') ? 'goto'
			   OR (SELECT count(*) FROM jsonb_object_keys(step -> 'on_reject')) <> 1 THEN
				PERFORM orch._definition_error('22023', obj, path || '.on_reject',
					format('expected "fail" or {"goto": "step"}, got %s', step -> 'on_reject'),
					hint => 'A rejected approval fails the run, or the run goes on at the step that on_reject names.');
			END IF;
			v_on_error := orch._compile_on_error(
				jsonb_build_array(jsonb_build_object('errors', jsonb_build_array('ORREJ'),
													 'goto', step -> 'on_reject' -> 'goto')),
				names, sname, obj, path || '.on_reject') || coalesce(v_on_error, '[]');
		END IF;

		-- task
		v_queue := NULL;
		v_sts := NULL;
		v_hbt := NULL;
		IF kind = 'task' THEN
			IF jsonb_typeof(step -> 'queue') IS DISTINCT FROM 'string'
			   OR (step ->> 'queue') !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
				PERFORM orch._definition_error('22023', obj, path || '.queue',
					format('task step "%s" needs a "queue" name', sname),
					hint => 'A queue name has 1 to 63 letters, digits, underscores, dots, colons or hyphens; workers claim from it with orch.claim_tasks.');
			END IF;
			v_queue := step ->> 'queue';
			IF step ? 'schedule_to_start' THEN
				v_sts := orch._duration(step -> 'schedule_to_start', obj, path || '.schedule_to_start');
			END IF;
			IF step ? 'heartbeat_timeout' THEN
				v_hbt := orch._duration(step -> 'heartbeat_timeout', obj, path || '.heartbeat_timeout');
			END IF;
		END IF;

		-- circuit: the named target the step calls
		v_circuit := NULL;
		IF step ? 'circuit' THEN
			IF kind IN ('sleep', 'wait_event', 'approval', 'subworkflow', 'map') THEN
				PERFORM orch._definition_error('22023', obj, path || '.circuit',
					format('%s step "%s" calls nothing a circuit could guard', kind, sname));
			END IF;
			IF jsonb_typeof(step -> 'circuit') IS DISTINCT FROM 'string'
			   OR (step ->> 'circuit') !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
				PERFORM orch._definition_error('22023', obj, path || '.circuit',
					'expected the name of a circuit',
					hint => 'A circuit name has 1 to 63 letters, digits, underscores, dots, colons or hyphens.');
			END IF;
			v_circuit := step ->> 'circuit';
		END IF;

		-- sleep
		v_for := NULL;
		v_until := NULL;
		IF kind = 'sleep' THEN
			IF (step ? 'duration') = (step ? 'until') THEN
				PERFORM orch._definition_error('22023', obj, path,
					format('sleep step "%s" needs exactly one of "duration" and "until"', sname),
					hint => '"duration" is a duration string; "until" is a jsonpath to a timestamp in the run context.');
			END IF;
			IF step ? 'duration' THEN
				v_for := orch._duration(step -> 'duration', obj, path || '.duration');
			ELSE
				IF jsonb_typeof(step -> 'until') <> 'string' THEN
					PERFORM orch._definition_error('22023', obj, path || '.until',
						'expected a jsonpath string');
				END IF;
				BEGIN
					v_until := (step ->> 'until')::jsonpath;
				EXCEPTION WHEN OTHERS THEN
					PERFORM orch._definition_error('42601', obj, path || '.until',
						format('invalid jsonpath in "until" of step "%s"', sname), SQLERRM);
				END;
			END IF;
		END IF;

		-- wait_event: the event's name, and what its timeout does
		v_event := NULL;
		v_on_timeout := NULL;
		IF kind = 'wait_event' THEN
			IF jsonb_typeof(step -> 'event') IS DISTINCT FROM 'string'
			   OR (step ->> 'event') !~ '^[A-Za-z0-9_.:/-]{1,200}$' THEN
				PERFORM orch._definition_error('22023', obj, path || '.event',
					format('wait_event step "%s" needs an "event" name', sname),
					hint => 'An event name has 1 to 200 letters, digits, underscores, dots, colons, slashes or hyphens; orch.send_event sends it.');
			END IF;
			v_event := step ->> 'event';
			v_on_timeout := 'fail';
			IF step ? 'on_timeout' THEN
				IF jsonb_typeof(step -> 'on_timeout') IS DISTINCT FROM 'string'
				   OR (step ->> 'on_timeout') NOT IN ('fail', 'skip', 'human') THEN
					PERFORM orch._definition_error('22023', obj, path || '.on_timeout',
						format('expected "fail", "skip" or "human", got %s', step -> 'on_timeout'),
						hint => 'fail: the step fails (on_error rules apply, SQLSTATE ORTMO); skip: it is skipped; human: it waits in the human queue.');
				END IF;
				IF NOT step ? 'timeout' THEN
					PERFORM orch._definition_error('22023', obj, path || '.on_timeout',
						format('wait_event step "%s" has "on_timeout" but no "timeout"', sname),
						hint => 'Without a timeout the step waits for its event as long as the run lives.');
				END IF;
				v_on_timeout := step ->> 'on_timeout';
			END IF;
		END IF;

		-- approval: approvers (a role), quorum, four-eyes, what is shown, expiry
		v_approvers := NULL;
		v_quorum := NULL;
		v_self := NULL;
		v_paths := ARRAY[NULL, NULL, NULL]::jsonpath[];
		v_escalate := NULL;
		IF kind = 'approval' THEN
			IF jsonb_typeof(step -> 'approvers') IS DISTINCT FROM 'string' THEN
				PERFORM orch._definition_error('22023', obj, path || '.approvers',
					format('approval step "%s" needs "approvers", the name of a role', sname),
					hint => 'Members of that role may approve or reject.');
			END IF;
			v_approvers := step ->> 'approvers';
			IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = v_approvers) THEN
				PERFORM orch._definition_error('42704', obj, path || '.approvers',
					format('role "%s" does not exist', v_approvers),
					hint => 'Create the role and grant it to the people who approve.');
			END IF;
			v_quorum := 1;
			IF step ? 'quorum' THEN
				IF jsonb_typeof(step -> 'quorum') <> 'number' OR (step ->> 'quorum') !~ '^[0-9]+$'
				   OR (step ->> 'quorum')::numeric NOT BETWEEN 1 AND 100 THEN
					PERFORM orch._definition_error('22023', obj, path || '.quorum',
						format('expected a whole number from 1 to 100, got %s', step -> 'quorum'),
						hint => 'The number of distinct approvers the gate needs.');
				END IF;
				v_quorum := (step ->> 'quorum')::int;
			END IF;
			v_self := false;
			IF step ? 'allow_self_approval' THEN
				IF jsonb_typeof(step -> 'allow_self_approval') <> 'boolean' THEN
					PERFORM orch._definition_error('22023', obj, path || '.allow_self_approval',
						'expected true or false',
						hint => 'By default the owner of a run cannot approve its gates (four eyes).');
				END IF;
				v_self := (step -> 'allow_self_approval')::boolean;
			END IF;
			FOR j IN 1 .. 3 LOOP
				akey := (ARRAY['payload', 'target', 'evidence'])[j];
				IF step ? akey THEN
					IF jsonb_typeof(step -> akey) <> 'string' THEN
						PERFORM orch._definition_error('22023', obj, path || '.' || akey,
							'expected a jsonpath string over the run context',
							hint => 'For instance "$.steps.draft" shows the approvers the output of step draft.');
					END IF;
					BEGIN
						v_paths[j] := (step ->> akey)::jsonpath;
					EXCEPTION WHEN OTHERS THEN
						PERFORM orch._definition_error('42601', obj, path || '.' || akey,
							format('invalid jsonpath in "%s" of step "%s"', akey, sname), SQLERRM);
					END;
				END IF;
			END LOOP;
			v_on_timeout := 'reject';
			IF step ? 'on_timeout' THEN
				IF NOT step ? 'timeout' THEN
					PERFORM orch._definition_error('22023', obj, path || '.on_timeout',
						format('approval step "%s" has "on_timeout" but no "timeout"', sname),
						hint => 'Without a timeout the request waits as long as the run lives.');
				END IF;
				IF step -> 'on_timeout' IN ('"reject"', '"human"') THEN
					v_on_timeout := step ->> 'on_timeout';
				ELSIF jsonb_typeof(step -> 'on_timeout') = 'object'
					  AND jsonb_typeof(step -> 'on_timeout' -> 'escalate') = 'string'
					  AND (SELECT count(*) FROM jsonb_object_keys(step -> 'on_timeout')) = 1 THEN
					v_on_timeout := 'escalate';
					v_escalate := step -> 'on_timeout' ->> 'escalate';
					IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = v_escalate) THEN
						PERFORM orch._definition_error('42704', obj, path || '.on_timeout.escalate',
							format('role "%s" does not exist', v_escalate));
					END IF;
				ELSE
					PERFORM orch._definition_error('22023', obj, path || '.on_timeout',
						format('expected "reject", "human" or {"escalate": "role"}, got %s', step -> 'on_timeout'),
						hint => 'reject: the request is rejected; human: the step waits in the human queue; escalate: the request goes to another role, with a new timeout.');
				END IF;
			END IF;
		END IF;

		-- subworkflow: a child run of another workflow
		v_sub := NULL;
		v_sub_input := NULL;
		IF kind IN ('subworkflow', 'map') THEN
			IF jsonb_typeof(step -> 'workflow') IS DISTINCT FROM 'string' THEN
				PERFORM orch._definition_error('22023', obj, path || '.workflow',
					format('%s step "%s" needs the name of a "workflow"', kind, sname),
					hint => CASE kind WHEN 'map' THEN 'A map step runs that workflow once per item.' END);
			END IF;
			v_sub := step ->> 'workflow';
			IF v_sub = wf THEN
				PERFORM orch._definition_error('22023', obj, path || '.workflow',
					format('%s step "%s" starts its own workflow', kind, sname),
					hint => 'A workflow cannot be its own child.');
			END IF;
			IF NOT EXISTS (SELECT FROM orch.workflows w WHERE w.name = v_sub) THEN
				PERFORM orch._definition_error('42704', obj, path || '.workflow',
					format('workflow "%s" does not exist', v_sub),
					hint => 'Define the child workflow first.');
			END IF;
			-- the current versions of the workflows it starts must not start this one
			IF EXISTS (
				WITH RECURSIVE reach(w) AS (
					SELECT v_sub
					UNION
					SELECT ws.subworkflow
					  FROM reach
					  JOIN LATERAL (SELECT max(w0.version) AS v FROM orch.workflows w0
									 WHERE w0.name = reach.w) cur ON true
					  JOIN orch.workflow_steps ws
						ON ws.workflow = reach.w AND ws.version = cur.v AND ws.subworkflow IS NOT NULL)
				SELECT FROM reach WHERE w = wf) THEN
				PERFORM orch._definition_error('22023', obj, path || '.workflow',
					format('%s step "%s" starts workflow "%s", which starts "%s" again', kind, sname, v_sub, wf),
					hint => 'Runs would start each other without end.');
			END IF;
			IF step ? 'timeout' THEN
				PERFORM orch._definition_error('22023', obj, path || '.timeout',
					format('%s step "%s" has no timeout of its own', kind, sname),
					hint => 'Its child runs share the run''s deadline (orch.start_run(..., deadline => ...)).');
			END IF;
			IF step ? 'input' THEN
				IF jsonb_typeof(step -> 'input') <> 'string' THEN
					PERFORM orch._definition_error('22023', obj, path || '.input',
						'expected a jsonpath string over the run context',
						hint => 'For instance "$.steps.order" makes the output of step order the child''s input.');
				END IF;
				BEGIN
					v_sub_input := (step ->> 'input')::jsonpath;
				EXCEPTION WHEN OTHERS THEN
					PERFORM orch._definition_error('42601', obj, path || '.input',
						format('invalid jsonpath in "input" of step "%s"', sname), SQLERRM);
				END;
			END IF;
		END IF;

		-- map: a child run per item of an array
		v_items := NULL;
		v_maxconc := NULL;
		v_tol := NULL;
		v_tolpct := NULL;
		IF kind = 'map' THEN
			IF jsonb_typeof(step -> 'items') IS DISTINCT FROM 'string' THEN
				PERFORM orch._definition_error('22023', obj, path || '.items',
					format('map step "%s" needs "items", a jsonpath to an array in the run context', sname),
					hint => 'For instance "$.input.lines".');
			END IF;
			BEGIN
				v_items := (step ->> 'items')::jsonpath;
			EXCEPTION WHEN OTHERS THEN
				PERFORM orch._definition_error('42601', obj, path || '.items',
					format('invalid jsonpath in "items" of step "%s"', sname), SQLERRM);
			END;
			v_maxconc := 10;
			IF step ? 'max_concurrency' THEN
				IF jsonb_typeof(step -> 'max_concurrency') <> 'number'
				   OR (step ->> 'max_concurrency') !~ '^[0-9]+$'
				   OR (step ->> 'max_concurrency')::numeric NOT BETWEEN 1 AND 10000 THEN
					PERFORM orch._definition_error('22023', obj, path || '.max_concurrency',
						format('expected a whole number from 1 to 10000, got %s', step -> 'max_concurrency'),
						hint => 'How many items run at once.');
				END IF;
				v_maxconc := (step ->> 'max_concurrency')::int;
			END IF;
			v_tol := 0;
			IF step ? 'tolerated_failures' THEN
				IF jsonb_typeof(step -> 'tolerated_failures') = 'number'
				   AND (step ->> 'tolerated_failures') ~ '^[0-9]{1,9}$' THEN
					v_tol := (step ->> 'tolerated_failures')::int;
				ELSIF jsonb_typeof(step -> 'tolerated_failures') = 'string'
					  AND (step ->> 'tolerated_failures') ~ '^[0-9]{1,3}(\.[0-9]+)?%$'
					  AND rtrim(step ->> 'tolerated_failures', '%')::numeric <= 100 THEN
					v_tol := NULL;
					v_tolpct := rtrim(step ->> 'tolerated_failures', '%')::numeric;
				ELSE
					PERFORM orch._definition_error('22023', obj, path || '.tolerated_failures',
						format('expected a count or a percentage such as "10%%", got %s', step -> 'tolerated_failures'),
						hint => 'How many items may fail (failed, cancelled or timed out) before the map step fails.');
				END IF;
			END IF;
		END IF;

		-- validation: input_schema, output_schema (src/jsonschema.c); review_if
		v_in_schema := NULL;
		v_out_schema := NULL;
		FOREACH schema_key IN ARRAY ARRAY['input_schema', 'output_schema'] LOOP
			IF step ? schema_key THEN
				v_problem := orch._schema_problem(step -> schema_key);
				IF v_problem IS NOT NULL THEN
					PERFORM orch._definition_error('22023', obj, path || '.' || schema_key || v_problem[1],
						v_problem[2],
						hint => 'Schemas use type, required, properties, items, enum, minimum, maximum, minLength, maxLength, pattern and additionalProperties (and title, description, $comment).');
				END IF;
			END IF;
		END LOOP;
		v_in_schema := step -> 'input_schema';
		v_out_schema := step -> 'output_schema';
		v_review := NULL;
		IF step ? 'review_if' THEN
			IF jsonb_typeof(step -> 'review_if') <> 'string' THEN
				PERFORM orch._definition_error('22023', obj, path || '.review_if',
					'expected a jsonpath predicate string');
			END IF;
			BEGIN
				v_review := (step ->> 'review_if')::jsonpath;
			EXCEPTION WHEN OTHERS THEN
				PERFORM orch._definition_error('42601', obj, path || '.review_if',
					format('invalid jsonpath in "review_if" of step "%s"', sname),
					SQLERRM,
					'review_if is a SQL/JSON path predicate over the step''s output, such as $.confidence < 0.8.');
			END;
		END IF;

		-- retry: a policy inline, or the name of one
		v_retry := orch._compile_retry(step -> 'retry', obj, path || '.retry');
		v_max_att := (v_retry ->> 'max_attempts')::int;
		v_init := (v_retry ->> 'initial_interval')::interval;
		v_coef := (v_retry ->> 'backoff_coefficient')::float8;
		v_maxint := (v_retry ->> 'max_interval')::interval;
		v_jitter := (v_retry ->> 'jitter')::boolean;
		v_nonretry := nullif(v_retry -> 'non_retryable', 'null'::jsonb);
		v_stc := (v_retry ->> 'schedule_to_close')::interval;

		v_timeout := NULL;
		IF step ? 'timeout' THEN
			v_timeout := orch._duration(step -> 'timeout', obj, path || '.timeout');
		END IF;

		c_kind := c_kind || kind;
		c_needs := c_needs || to_jsonb(need_names);
		c_guard := c_guard || v_guard;
		c_fname := c_fname || fn_text;
		c_fn := c_fn || proc;
		c_sleep_for := c_sleep_for || v_for;
		c_sleep_until := c_sleep_until || v_until;
		c_max_att := c_max_att || v_max_att;
		c_init := c_init || v_init;
		c_coef := c_coef || v_coef;
		c_maxint := c_maxint || v_maxint;
		c_jitter := c_jitter || v_jitter;
		c_timeout := c_timeout || v_timeout;
		c_nonretry := c_nonretry || v_nonretry;
		c_stc := c_stc || v_stc;
		c_queue := c_queue || v_queue;
		c_sts := c_sts || v_sts;
		c_hbt := c_hbt || v_hbt;
		c_circuit := c_circuit || v_circuit;
		c_event := c_event || v_event;
		c_on_timeout := c_on_timeout || v_on_timeout;
		c_in_schema := c_in_schema || v_in_schema;
		c_out_schema := c_out_schema || v_out_schema;
		c_review := c_review || v_review;
		c_approvers := c_approvers || v_approvers;
		c_quorum := c_quorum || v_quorum;
		c_self := c_self || v_self;
		c_apayload := c_apayload || v_paths[1];
		c_atarget := c_atarget || v_paths[2];
		c_aevidence := c_aevidence || v_paths[3];
		c_escalate := c_escalate || v_escalate;
		c_sub := c_sub || v_sub;
		c_sub_input := c_sub_input || v_sub_input;
		c_items := c_items || v_items;
		c_maxconc := c_maxconc || v_maxconc;
		c_tol := c_tol || v_tol;
		c_tolpct := c_tolpct || v_tolpct;
		c_policy := c_policy || (v_retry ->> 'policy');
		c_verify := c_verify || v_verify;
		c_comp := c_comp || v_comp;
		c_idem := c_idem || v_idem;
		c_on_error := c_on_error || v_on_error;
		c_explicit := c_explicit || (step ? 'needs');
	END LOOP;

	/*
	 * Route targets run only when a step's on_error sends the run there: the
	 * steps that may route to one are its needs, and it runs if one of them
	 * did (or is skipped once all have finished otherwise).
	 */
	c_target := array_fill(false, ARRAY[cardinality(names)]);
	FOR i IN 1 .. cardinality(names) LOOP
		FOR sname IN SELECT DISTINCT r ->> 'goto' FROM jsonb_array_elements(c_on_error[i]) r
					  WHERE r ? 'goto' LOOP
			j := array_position(names, sname);
			IF c_explicit[j] THEN
				PERFORM orch._definition_error('22023', obj, format('$.steps[%s].needs', j - 1),
					format('step "%s" is where on_error of step "%s" goes, so it cannot have needs',
						   sname, names[i]),
					hint => 'A step that on_error goes to runs only when the run is routed there; the steps that route to it are its needs.');
			END IF;
			IF NOT c_target[j] THEN
				c_needs[j] := '[]';
				c_target[j] := true;
			END IF;
			c_needs[j] := c_needs[j] || to_jsonb(names[i]);
		END LOOP;
	END LOOP;

	-- Cycles: Kahn's algorithm; whatever cannot be ordered lies on or behind a cycle.
	indeg := array_fill(0, ARRAY[cardinality(names)]);
	FOR i IN 1 .. cardinality(names) LOOP
		indeg[i] := jsonb_array_length(c_needs[i]);
	END LOOP;
	queue := ARRAY(SELECT g FROM generate_series(1, cardinality(names)) g WHERE indeg[g] = 0);
	WHILE cardinality(queue) > 0 LOOP
		cur := queue[1];
		queue := queue[2:];
		done_count := done_count + 1;
		FOR i IN 1 .. cardinality(names) LOOP
			IF c_needs[i] ? names[cur] THEN
				indeg[i] := indeg[i] - 1;
				IF indeg[i] = 0 THEN
					queue := queue || i;
				END IF;
			END IF;
		END LOOP;
	END LOOP;
	IF done_count < cardinality(names) THEN
		-- Walk needs among the unordered steps until a step repeats: that is a cycle.
		cur := (SELECT min(g) FROM generate_series(1, cardinality(names)) g WHERE indeg[g] > 0);
		cycle := '{}';
		WHILE NOT names[cur] = ANY (cycle) LOOP
			cycle := cycle || names[cur];
			cur := (SELECT array_position(names, n)
					FROM jsonb_array_elements_text(c_needs[cur]) n
					WHERE indeg[array_position(names, n)] > 0
					LIMIT 1);
		END LOOP;
		cycle := cycle[array_position(cycle, names[cur]):] || names[cur];
		PERFORM orch._definition_error('22023', obj,
			format('$.steps[%s].needs', array_position(names, cycle[1]) - 1),
			format('dependency cycle: %s', array_to_string(cycle, ' -> ')),
			'A step runs after all of its needs, and a step that on_error goes to after the steps that route to it, so these must not form a cycle.');
	END IF;

	-- Store: the same definition again keeps its version.
	PERFORM pg_advisory_xact_lock(hashtext('orch.define_workflow'), hashtext(wf));
	SELECT w.version, w.definition INTO rec
	  FROM orch.workflows w WHERE w.name = wf ORDER BY w.version DESC LIMIT 1;
	IF FOUND AND rec.definition = def THEN
		RETURN rec.version;
	END IF;
	v_version := coalesce(rec.version, 0) + 1;

	INSERT INTO orch.workflows (name, version, definition, created_by)
	VALUES (wf, v_version, def, orch._caller());

	-- circuits named for the first time start closed, with the defaults
	INSERT INTO orch.circuits (name)
	SELECT DISTINCT c FROM unnest(c_circuit) c WHERE c IS NOT NULL
	ON CONFLICT (name) DO NOTHING;

	INSERT INTO orch.workflow_steps (workflow, version, name, ordinal, kind, needs, dependents,
		guard, function_name, function, sleep_for, sleep_until, max_attempts, initial_interval,
		backoff_coefficient, max_interval, jitter, non_retryable, schedule_to_close,
		retry_policy, timeout, queue, circuit, schedule_to_start, heartbeat_timeout,
		idempotent, verify_name, verify, compensate_name, compensate, on_error, routes, route_target,
		event, on_timeout, input_schema, output_schema, review_if, approvers, quorum, allow_self,
		approval_payload, approval_target, approval_evidence, escalate_to, subworkflow, sub_input,
		map_items, max_concurrency, tolerated_failures, tolerated_pct)
	SELECT wf, v_version, names[k], k, c_kind[k],
		   ARRAY(SELECT jsonb_array_elements_text(c_needs[k])),
		   ARRAY(SELECT names[d] FROM generate_series(1, cardinality(names)) d
				 WHERE c_needs[d] ? names[k] ORDER BY d),
		   c_guard[k], c_fname[k], c_fn[k], c_sleep_for[k], c_sleep_until[k], c_max_att[k],
		   c_init[k], c_coef[k], c_maxint[k], c_jitter[k],
		   CASE WHEN c_nonretry[k] IS NOT NULL
				THEN ARRAY(SELECT jsonb_array_elements_text(c_nonretry[k])) END,
		   c_stc[k], c_policy[k], c_timeout[k], c_queue[k], c_circuit[k], c_sts[k], c_hbt[k],
		   c_idem[k], steps -> (k - 1) ->> 'verify', c_verify[k],
		   steps -> (k - 1) ->> 'compensate', c_comp[k], c_on_error[k],
		   ARRAY(SELECT DISTINCT r ->> 'goto' FROM jsonb_array_elements(c_on_error[k]) r
				  WHERE r ? 'goto' ORDER BY 1),
		   c_target[k], c_event[k], c_on_timeout[k], c_in_schema[k], c_out_schema[k], c_review[k],
		   c_approvers[k], c_quorum[k], c_self[k], c_apayload[k], c_atarget[k], c_aevidence[k],
		   c_escalate[k], c_sub[k], c_sub_input[k], c_items[k], c_maxconc[k], c_tol[k], c_tolpct[k]
	  FROM generate_series(1, cardinality(names)) k;

	RETURN v_version;
END
$$;

/*
 * Define or replace a named retry policy; returns it completed with the
 * defaults.  Workflows name it as "retry": "<name>".
 */
CREATE FUNCTION orch.define_retry_policy(name text, policy jsonb) RETURNS jsonb
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	obj			text := format('retry policy "%s"', define_retry_policy.name);
	compiled	jsonb;
BEGIN
	IF define_retry_policy.name IS NULL
	   OR define_retry_policy.name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('invalid retry policy name "%s"', coalesce(define_retry_policy.name, 'NULL')),
			HINT = 'A policy name starts with a letter or underscore and has at most 63 letters, digits, underscores, dots or hyphens.';
	END IF;
	IF policy IS NULL OR jsonb_typeof(policy) <> 'object' THEN
		PERFORM orch._definition_error('22023', obj, '$',
			format('expected an object, got %s', coalesce(jsonb_typeof(policy), 'NULL')));
	END IF;
	compiled := orch._compile_retry(policy, obj, '$');
	INSERT INTO orch.retry_policies AS p (name, policy, definition, updated_by)
	VALUES (define_retry_policy.name, compiled, policy, orch._caller())
	ON CONFLICT (name) DO UPDATE
	   SET policy = excluded.policy, definition = excluded.definition,
		   updated_at = now(), updated_by = excluded.updated_by;
	RETURN compiled;
END
$$;

/* ------------------------------------------------------------------------
 * Runs
 * ------------------------------------------------------------------------ */

-- A run of the workflow's current version, for start_run and subworkflow steps.
CREATE FUNCTION orch._start_run(workflow text, input jsonb, idempotency_key text,
								business_key text, priority int, deadline timestamptz,
								tenant text, owner name, parent_run uuid, parent_step bigint,
								parent_attempt int DEFAULT NULL, parent_item int DEFAULT NULL)
	RETURNS uuid
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	v_version	int;
	v_nsteps	int;
	v_run		uuid;
	v_input		jsonb := coalesce(_start_run.input, '{}');
	existing	record;
BEGIN
	SELECT w.version INTO v_version
	  FROM orch.workflows w WHERE w.name = _start_run.workflow
	 ORDER BY w.version DESC LIMIT 1;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_object',
			MESSAGE = format('workflow "%s" does not exist', _start_run.workflow),
			HINT = 'Define it first with orch.define_workflow(name, definition).';
	END IF;
	SELECT count(*) INTO v_nsteps FROM orch.workflow_steps ws
	 WHERE ws.workflow = _start_run.workflow AND ws.version = v_version;

	INSERT INTO orch.runs AS r (workflow, version, input, owner, business_key, idempotency_key,
							   trace_id, tenant, priority, deadline, steps_left, parent_run_id,
							   parent_step_id, parent_attempt, parent_item)
	VALUES (_start_run.workflow, v_version, v_input, _start_run.owner, _start_run.business_key,
			_start_run.idempotency_key, uuid_send(gen_random_uuid()), _start_run.tenant,
			_start_run.priority, _start_run.deadline, v_nsteps, _start_run.parent_run,
			_start_run.parent_step, _start_run.parent_attempt, _start_run.parent_item)
	ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
	RETURNING r.run_id INTO v_run;

	IF v_run IS NULL THEN
		-- The key was used before (perhaps by a transaction that just committed).
		SELECT r.run_id, r.input INTO existing
		  FROM orch.runs r
		 WHERE r.workflow = _start_run.workflow AND r.idempotency_key = _start_run.idempotency_key;
		IF existing.input IS DISTINCT FROM v_input THEN
			RAISE EXCEPTION USING ERRCODE = 'unique_violation',
				MESSAGE = format('idempotency key "%s" of workflow "%s" was already used with a different input',
								 _start_run.idempotency_key, _start_run.workflow),
				DETAIL = format('Run %s was started with that key.', existing.run_id),
				HINT = 'Use a new idempotency key for a different request, or repeat the original input.';
		END IF;
		RETURN existing.run_id;
	END IF;

	INSERT INTO orch.steps (run_id, name, queue, priority, circuit, status, pending_needs, wake_at)
	SELECT v_run, ws.name, ws.queue, _start_run.priority, ws.circuit,
		   CASE WHEN cardinality(ws.needs) = 0 THEN 'ready' ELSE 'pending' END::orch.step_status,
		   cardinality(ws.needs),
		   CASE WHEN cardinality(ws.needs) = 0 THEN now() END
	  FROM orch.workflow_steps ws
	 WHERE ws.workflow = _start_run.workflow AND ws.version = v_version
	 ORDER BY ws.ordinal;

	PERFORM orch._wake_at_end();
	RETURN v_run;
END
$$;

CREATE FUNCTION orch.start_run(workflow text,
							   input jsonb DEFAULT '{}',
							   idempotency_key text DEFAULT NULL,
							   business_key text DEFAULT NULL,
							   priority int DEFAULT 0,
							   deadline timestamptz DEFAULT NULL,
							   tenant text DEFAULT NULL)
	RETURNS uuid
	LANGUAGE sql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT orch._start_run(workflow, input, idempotency_key, business_key, priority, deadline,
						   tenant, orch._caller(), NULL, NULL)
$$;

CREATE FUNCTION orch._lock_run(run_id uuid) RETURNS orch.runs
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	r orch.runs;
BEGIN
	-- The engine skips locked runs: have it look again when we are done,
	-- whether we commit or not.
	PERFORM orch._wake_at_end();
	SELECT * INTO r FROM orch.runs WHERE orch.runs.run_id = _lock_run.run_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_object',
			MESSAGE = format('run %s does not exist', _lock_run.run_id);
	END IF;
	RETURN r;
END
$$;

/*
 * Compensation (sagas): when a run fails, is cancelled or passes its
 * deadline, the steps that succeeded and have a compensate function are
 * undone one at a time, latest finished first.  This arms the next one: the
 * engine calls its compensate function, records the try as an attempt of
 * kind compensate, marks the step compensated and arms the one before it.
 */
CREATE FUNCTION orch._compensate_next(run_id uuid) RETURNS boolean
	LANGUAGE sql
	SET search_path = pg_catalog, pg_temp
AS $$
	WITH next AS (
		SELECT s.step_id
		  FROM orch.steps s
		  JOIN orch.runs r ON r.run_id = s.run_id
		  JOIN orch.workflow_steps ws
			ON ws.workflow = r.workflow AND ws.version = r.version AND ws.name = s.name
		 WHERE s.run_id = $1 AND s.status = 'succeeded' AND ws.compensate IS NOT NULL
		 ORDER BY s.finished_at DESC, s.step_id DESC
		 LIMIT 1),
	armed AS (
		UPDATE orch.steps s
		   SET status = 'ready', phase = 'compensate', wake_at = now(), error = NULL
		  FROM next WHERE s.step_id = next.step_id
		RETURNING 1)
	SELECT EXISTS (SELECT FROM armed)
$$;

-- Cancel a run: every step not yet finished is cancelled, and the steps that
-- succeeded are compensated.  Returns false when the run had already finished.
CREATE FUNCTION orch.cancel_run(run_id uuid, reason text DEFAULT NULL) RETURNS boolean
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	r orch.runs;
BEGIN
	r := orch._lock_run(cancel_run.run_id);
	IF r.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
		RAISE NOTICE 'run % has already finished with status %', r.run_id, r.status;
		RETURN false;
	END IF;
	PERFORM orch._cancel_locked(r.run_id,
								jsonb_build_object('cancelled_by', orch._caller(), 'reason', cancel_run.reason),
								cancel_run.reason);
	RETURN true;
END
$$;

-- Pause a run: the engine starts no further step of it until resume_run.
CREATE FUNCTION orch.pause_run(run_id uuid, reason text DEFAULT NULL) RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	r orch.runs;
BEGIN
	r := orch._lock_run(pause_run.run_id);
	IF r.status = 'paused' THEN
		RETURN;
	END IF;
	IF r.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('run %s cannot be paused: it has finished with status %s', r.run_id, r.status);
	END IF;
	UPDATE orch.runs SET status = 'paused', paused_from = r.status, reason = pause_run.reason
	 WHERE orch.runs.run_id = r.run_id;
	-- Park the ready steps; sleeping and retrying steps keep their timers and
	-- are parked by the engine when they come due.
	UPDATE orch.steps s SET wake_at = 'infinity'
	 WHERE s.run_id = r.run_id AND s.status = 'ready';
END
$$;

CREATE FUNCTION orch.resume_run(run_id uuid, reason text DEFAULT NULL) RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	r orch.runs;
BEGIN
	r := orch._lock_run(resume_run.run_id);
	IF r.status <> 'paused' THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('run %s is not paused (status %s)', r.run_id, r.status);
	END IF;
	UPDATE orch.runs SET status = coalesce(r.paused_from, 'running'::orch.run_status), paused_from = NULL,
		   reason = resume_run.reason
	 WHERE orch.runs.run_id = r.run_id;
	UPDATE orch.steps s SET wake_at = now()
	 WHERE s.run_id = r.run_id AND s.status IN ('ready', 'waiting', 'retrying', 'blocked', 'needs_approval')
	   AND s.wake_at = 'infinity';
END
$$;

/*
 * Redrive a failed run, or one that waits for a human after an unknown
 * outcome: its failed steps run again with a fresh attempt budget, the steps
 * cancelled by the failure wait for their needs again, and every step that
 * succeeded keeps its result and is not run again.  For a run whose
 * compensation stopped at a step for a human, that compensation is tried
 * again instead, and the saga goes on from there.
 */
CREATE FUNCTION orch.retry_run(run_id uuid, reason text DEFAULT NULL) RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	r orch.runs;
BEGIN
	r := orch._lock_run(retry_run.run_id);

	-- a compensation that stopped for a human goes on from where it stopped
	IF r.status IN ('failed', 'cancelled', 'timed_out') AND EXISTS (
		SELECT FROM orch.steps s
		 WHERE s.run_id = r.run_id AND s.phase = 'compensate' AND s.status = 'needs_human') THEN
		UPDATE orch.steps s SET status = 'ready', wake_at = now(), error = NULL
		 WHERE s.run_id = r.run_id AND s.phase = 'compensate' AND s.status = 'needs_human';
		UPDATE orch.runs SET reason = retry_run.reason WHERE orch.runs.run_id = r.run_id;
		RETURN;
	END IF;

	IF r.status NOT IN ('failed', 'needs_human') THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('run %s cannot be retried: its status is %s', r.run_id, r.status),
			HINT = 'Only failed runs, and runs waiting for a human after an unknown outcome, are retried.';
	END IF;
	IF EXISTS (SELECT FROM orch.steps s
			   WHERE s.run_id = r.run_id AND (s.status = 'compensated' OR s.phase = 'compensate')) THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('run %s cannot be retried: its steps are being or have been compensated', r.run_id),
			HINT = 'What the run did is undone; start a new run.';
	END IF;

	-- the steps that failed (unless on_error routed the run on), or whose
	-- outcome is unknown, go again
	UPDATE orch.steps s
	   SET status = 'ready', wake_at = now(), attempt_base = s.attempt, error = NULL,
		   started_at = NULL, finished_at = NULL, phase = NULL
	 WHERE s.run_id = r.run_id
	   AND (s.status = 'needs_human' OR (s.status = 'failed' AND NOT coalesce(s.error ? 'routed_to', false)));

	-- the steps cancelled with the failure wait for their unfinished needs
	UPDATE orch.steps s
	   SET status = CASE WHEN n.pending = 0 THEN 'ready' ELSE 'pending' END::orch.step_status,
		   pending_needs = n.pending, needs_ok = n.ok,
		   wake_at = CASE WHEN n.pending = 0 THEN now() END,
		   finished_at = NULL
	  FROM (SELECT c.step_id,
				   count(*) FILTER (WHERE NOT (d.status IN ('succeeded', 'skipped')
											   OR coalesce(d.status = 'failed' AND d.error ? 'routed_to', false)))::int AS pending,
				   count(*) FILTER (WHERE CASE WHEN ws.route_target
											   THEN coalesce(d.error ->> 'routed_to' = c.name, false)
											   ELSE d.status = 'succeeded' END)::int AS ok
			  FROM orch.steps c
			  JOIN orch.runs rr ON rr.run_id = c.run_id
			  JOIN orch.workflow_steps ws
				ON ws.workflow = rr.workflow AND ws.version = rr.version AND ws.name = c.name
			  LEFT JOIN orch.steps d ON d.run_id = c.run_id AND d.name = ANY (ws.needs)
			 WHERE c.run_id = r.run_id AND c.status = 'cancelled'
			 GROUP BY c.step_id) n
	 WHERE s.step_id = n.step_id;

	UPDATE orch.runs
	   SET status = CASE WHEN EXISTS (SELECT FROM orch.steps o
									   WHERE o.run_id = r.run_id AND o.status = 'needs_approval')
						 THEN 'needs_approval' ELSE 'running' END::orch.run_status,
		   error = NULL, output = NULL, finished_at = NULL,
		   reason = retry_run.reason,
		   steps_left = (SELECT count(*) FROM orch.steps s
						  WHERE s.run_id = r.run_id AND s.status NOT IN ('succeeded', 'skipped')
							AND NOT (s.status = 'failed' AND coalesce(s.error ? 'routed_to', false)))
	 WHERE orch.runs.run_id = r.run_id;
END
$$;

-- Block until the run has finished or the timeout passes; returns its status.
CREATE FUNCTION orch.wait_run(run_id uuid, timeout interval DEFAULT '30 seconds') RETURNS text
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_wait_run';

-- Advance due work in the calling session (what an engine worker does in
-- one batch).  For tests, operators and installations without the worker.
CREATE FUNCTION orch.tick(max_steps int DEFAULT 100) RETURNS int
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_tick';

/* ------------------------------------------------------------------------
 * Validation: the JSON Schema subset of input_schema and output_schema
 * (src/jsonschema.c)
 * ------------------------------------------------------------------------ */

-- NULL if a schema is in the supported subset, else {path in it, problem}.
CREATE FUNCTION orch._schema_problem(schema jsonb) RETURNS text[]
	LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
	AS 'MODULE_PATHNAME', 'orch_schema_problem';

-- Every violation of value against schema (up to 100), with its JSON path.
CREATE FUNCTION orch.validate_json(value jsonb, schema jsonb,
								   OUT path text, OUT message text) RETURNS SETOF record
	LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
	AS 'MODULE_PATHNAME', 'orch_validate_json';

/*
 * A step of the run no longer waits for a person: the run does as long as
 * another of its steps waits for one (needs_human before needs_approval),
 * else it runs.  Only a run that waits for a person, or is paused from
 * that, changes.  For orch.resolve, votes and the engine.
 */
CREATE FUNCTION orch._settle_run(run_id uuid, step_id bigint) RETURNS void
	LANGUAGE sql
	SET search_path = pg_catalog, pg_temp
AS $$
	WITH w AS (
		SELECT CASE WHEN bool_or(o.status = 'needs_human') THEN 'needs_human'
					WHEN bool_or(o.status = 'needs_approval') THEN 'needs_approval'
					ELSE 'running' END::orch.run_status AS status
		  FROM orch.steps o
		 WHERE o.run_id = $1 AND o.step_id <> $2
		   AND o.status IN ('needs_human', 'needs_approval'))
	UPDATE orch.runs r
	   SET status = CASE WHEN r.status IN ('needs_human', 'needs_approval') THEN w.status
						 ELSE r.status END,
		   paused_from = CASE WHEN r.paused_from IN ('needs_human', 'needs_approval') THEN w.status
							  ELSE r.paused_from END
	  FROM w
	 WHERE r.run_id = $1
$$;

/* ------------------------------------------------------------------------
 * The human queue: steps that wait for a person to decide (needs_human)
 * ------------------------------------------------------------------------ */

/*
 * Each step in needs_human with what a person needs to decide: why it is
 * there, its error, the run's input and the outputs of the steps that
 * succeeded so far, and the actions orch.resolve takes for it.
 */
CREATE VIEW orch.human_queue AS
SELECT s.step_id, s.run_id, r.workflow, r.version, s.name AS step, ws.kind,
	   s.phase IS NOT DISTINCT FROM 'compensate' AS compensating,
	   s.error OPERATOR(pg_catalog.->>) 'gave_up' AS why,
	   s.error, s.attempt,
	   COALESCE((SELECT pg_catalog.max(a.finished_at) FROM orch.attempts a
				  WHERE a.step_id = s.step_id), s.started_at) AS since,
	   r.input,
	   (SELECT COALESCE(pg_catalog.jsonb_object_agg(p.name, p.output), '{}')
		  FROM orch.steps p WHERE p.run_id = s.run_id AND p.status = 'succeeded') AS steps,
	   r.business_key, r.owner, r.tenant, r.priority,
	   CASE WHEN s.error ? 'held_output' THEN ARRAY['accept', 'retry', 'skip', 'fail', 'provide_input']
			ELSE ARRAY['retry', 'skip', 'fail', 'provide_input'] END AS actions
  FROM orch.steps s
  JOIN orch.runs r ON r.run_id = s.run_id
  JOIN orch.workflow_steps ws
	ON ws.workflow = r.workflow AND ws.version = r.version AND ws.name = s.name
 WHERE s.status = 'needs_human';

/*
 * A person decides about a step in needs_human:
 *   retry          run it again, with a fresh attempt budget;
 *   skip           it is skipped, and the run goes on without it;
 *   fail           it fails, and so does its run (which is compensated);
 *   provide_input  it succeeds, with data as its output (which must match
 *                  the step's output_schema);
 *   accept         (an output held for review by review_if) it succeeds with
 *                  the output it was held with.
 * For a step whose compensation stopped (the run has ended), retry tries the
 * compensation again, skip and provide_input count the step as compensated
 * (by hand), and fail gives its compensation up; the saga then goes on with
 * the step before it.  The decision is kept in the step's resolution, and
 * with the changes it causes, in the audit trail.
 */
CREATE FUNCTION orch.resolve(step_id bigint, action text, data jsonb DEFAULT NULL,
							 reason text DEFAULT NULL) RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	s		orch.steps;
	r		orch.runs;
	res		jsonb;
	v_data	jsonb := resolve.data;
	bad		record;
BEGIN
	IF resolve.action IS NULL
	   OR resolve.action NOT IN ('retry', 'skip', 'fail', 'provide_input', 'accept') THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('unknown action %s for step %s', coalesce(quote_literal(resolve.action), 'NULL'),
							 resolve.step_id),
			HINT = 'The actions are retry, skip, fail, provide_input and accept.';
	END IF;
	IF resolve.action = 'provide_input' AND (resolve.data IS NULL OR resolve.data = 'null'::jsonb) THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('provide_input for step %s needs data', resolve.step_id),
			HINT = 'The data becomes the step''s output, which the steps after it see in their context.';
	END IF;

	SELECT * INTO s FROM orch.steps WHERE orch.steps.step_id = resolve.step_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_object',
			MESSAGE = format('step %s does not exist', resolve.step_id);
	END IF;
	-- the run first, as the engine locks it, then the step as it is now
	r := orch._lock_run(s.run_id);
	SELECT * INTO s FROM orch.steps WHERE orch.steps.step_id = resolve.step_id FOR UPDATE;
	IF s.status <> 'needs_human' THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('step %s ("%s" of run %s) does not wait for a human: its status is %s',
							 s.step_id, s.name, s.run_id, s.status),
			HINT = 'orch.human_queue lists the steps that do.';
	END IF;

	IF resolve.action = 'accept' THEN
		IF NOT coalesce(s.error ? 'held_output', false) THEN
			RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
				MESSAGE = format('step %s ("%s" of run %s) has no output held for review', s.step_id, s.name, s.run_id),
				HINT = 'accept is for outputs that review_if held; provide_input gives a step its output.';
		END IF;
		v_data := s.error -> 'held_output';
	ELSIF resolve.action = 'provide_input' THEN
		-- what a person provides is held to the step's output_schema too
		SELECT v.path, v.message INTO bad
		  FROM orch.workflow_steps ws
		  CROSS JOIN LATERAL orch.validate_json(resolve.data, ws.output_schema) v
		 WHERE ws.workflow = r.workflow AND ws.version = r.version AND ws.name = s.name
		   AND ws.output_schema IS NOT NULL
		 LIMIT 1;
		IF FOUND THEN
			RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
				MESSAGE = format('the data for step %s ("%s") does not match its output_schema at %s: %s',
								 s.step_id, s.name, bad.path, bad.message),
				HINT = 'The data becomes the step''s output, and must be what the step itself would have to return.';
		END IF;
	END IF;

	-- a person in the human queue may ask again or give up, but not stand in for the approvers
	IF resolve.action NOT IN ('retry', 'fail') AND EXISTS (
		SELECT FROM orch.workflow_steps ws
		 WHERE ws.workflow = r.workflow AND ws.version = r.version AND ws.name = s.name
		   AND ws.kind = 'approval') THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('step %s ("%s" of run %s) is an approval: %s would decide it without its approvers',
							 s.step_id, s.name, s.run_id, resolve.action),
			HINT = 'retry asks the approvers again; fail fails the step.';
	END IF;

	res := jsonb_build_object('action', resolve.action, 'data', v_data, 'by', orch._caller(),
							  'at', now(), 'reason', resolve.reason);

	IF s.phase = 'compensate' THEN
		-- the run has ended; its saga stopped at this step
		IF resolve.action = 'retry' THEN
			UPDATE orch.steps SET status = 'ready', wake_at = now(), error = NULL, resolution = res
			 WHERE orch.steps.step_id = s.step_id;
		ELSE
			UPDATE orch.steps
			   SET status = CASE resolve.action WHEN 'fail' THEN 'failed' ELSE 'compensated' END::orch.step_status,
				   wake_at = NULL, resolution = res
			 WHERE orch.steps.step_id = s.step_id;
			PERFORM orch._compensate_next(r.run_id);
		END IF;
		RETURN;
	END IF;

	-- a subworkflow or map step set aside with children still running: they go
	PERFORM orch._cancel_child(c.run_id, r.run_id)
	   FROM orch.runs c
	  WHERE c.parent_step_id = s.step_id
		AND CASE WHEN c.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN false ELSE true END
	  ORDER BY c.run_id;

	IF resolve.action = 'retry' THEN
		UPDATE orch.steps
		   SET status = 'ready', wake_at = now(), attempt_base = s.attempt, error = NULL,
			   started_at = NULL, finished_at = NULL, phase = NULL, resolution = res
		 WHERE orch.steps.step_id = s.step_id;
	ELSE
		-- the engine finishes the step as decided, with everything that follows
		UPDATE orch.steps SET status = 'ready', wake_at = now(), phase = 'resolve', resolution = res
		 WHERE orch.steps.step_id = s.step_id;
	END IF;
	PERFORM orch._settle_run(r.run_id, s.step_id);
END
$$;

/* ------------------------------------------------------------------------
 * Events: orch.send_event and the wait_event steps that take them
 * ------------------------------------------------------------------------ */

/*
 * Keep an event for a run and wake the wait_event steps of the run that wait
 * for its name.  The run is locked first, as the engine locks it while it
 * advances the run's steps: an event sent while the engine finds a step
 * waiting is seen by that step once the engine's batch commits.  A run that
 * has finished is an error when strict, and NULL is returned otherwise.
 */
CREATE FUNCTION orch._send_event(run_id uuid, name text, payload jsonb, strict boolean)
	RETURNS bigint
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	r		orch.runs;
	v_id	bigint;
BEGIN
	IF _send_event.name IS NULL OR _send_event.name !~ '^[A-Za-z0-9_.:/-]{1,200}$' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('invalid event name %s', coalesce(quote_literal(_send_event.name), 'NULL')),
			HINT = 'An event name has 1 to 200 letters, digits, underscores, dots, colons, slashes or hyphens.';
	END IF;
	IF _send_event.payload IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = format('the payload of event "%s" is NULL', _send_event.name),
			HINT = 'Send ''{}'' for an event that carries no data.';
	END IF;
	r := orch._lock_run(_send_event.run_id);
	IF r.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
		IF NOT strict THEN
			RETURN NULL;
		END IF;
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('run %s has finished with status %s: no step of it will take event "%s"',
							 r.run_id, r.status, _send_event.name);
	END IF;
	INSERT INTO orch.events (run_id, name, payload, sent_by)
	VALUES (r.run_id, _send_event.name, _send_event.payload, orch._caller())
	RETURNING event_id INTO v_id;
	UPDATE orch.steps s SET wake_at = now()
	  FROM orch.workflow_steps ws
	 WHERE s.run_id = r.run_id AND s.status = 'waiting' AND s.wake_at > now()
	   AND ws.workflow = r.workflow AND ws.version = r.version AND ws.name = s.name
	   AND ws.kind = 'wait_event' AND ws.event = _send_event.name;
	RETURN v_id;
END
$$;

/*
 * Send an event to a run; returns its event_id.  A wait_event step of the
 * run that waits for this name takes it, the first sent first, whether it
 * already waits or gets there later.
 */
CREATE FUNCTION orch.send_event(run_id uuid, name text, payload jsonb DEFAULT '{}')
	RETURNS bigint
	LANGUAGE sql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT orch._send_event(run_id, name, payload, true)
$$;

/*
 * Send an event to every run of the workflow with the business key that has
 * not finished; returns how many runs it was sent to (0: none, and nothing
 * is kept).
 */
CREATE FUNCTION orch.send_event_by_key(workflow text, business_key text, name text,
									   payload jsonb DEFAULT '{}')
	RETURNS int
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	v_run	uuid;
	n		int := 0;
BEGIN
	IF NOT EXISTS (SELECT FROM orch.workflows w WHERE w.name = send_event_by_key.workflow) THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_object',
			MESSAGE = format('workflow "%s" does not exist', send_event_by_key.workflow);
	END IF;
	IF send_event_by_key.name IS NULL OR send_event_by_key.name !~ '^[A-Za-z0-9_.:/-]{1,200}$' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('invalid event name %s', coalesce(quote_literal(send_event_by_key.name), 'NULL')),
			HINT = 'An event name has 1 to 200 letters, digits, underscores, dots, colons, slashes or hyphens.';
	END IF;
	IF send_event_by_key.business_key IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'the business key is NULL',
			HINT = 'Runs get a business key from orch.start_run(..., business_key => ...).';
	END IF;
	-- Unfinished in a CASE, which the planner neither estimates from the
	-- statistics nor matches to the partial index runs_active: as status
	-- NOT IN (...), statistics taken while every run had finished made a
	-- full scan of runs_active look cheaper than the business key's index
	-- (see ORCH_RUN_STATUS_IN in src/orchestrator.h).  The same in
	-- orch.resolve, for map steps and in orch._cancel_children.
	FOR v_run IN
		SELECT r.run_id FROM orch.runs r
		 WHERE r.business_key = send_event_by_key.business_key
		   AND r.workflow = send_event_by_key.workflow
		   AND CASE WHEN r.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN false ELSE true END
		 ORDER BY r.run_id
	LOOP
		IF orch._send_event(v_run, send_event_by_key.name, send_event_by_key.payload, false) IS NOT NULL THEN
			n := n + 1;
		END IF;
	END LOOP;
	RETURN n;
END
$$;

/* ------------------------------------------------------------------------
 * Approvals: approval steps, orch.approve, orch.reject, pending_approvals
 * ------------------------------------------------------------------------ */

-- An approved request as the step's output: exactly what was approved.
CREATE FUNCTION orch._approval_output(a orch.approvals) RETURNS jsonb
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT jsonb_build_object(
		'approved', true, 'approval_id', a.approval_id,
		'payload', a.payload, 'target', a.target, 'evidence', a.evidence,
		'payload_hash', encode(a.payload_hash, 'hex'),
		'approved_by', (SELECT coalesce(jsonb_agg(v.voter ORDER BY v.voted_at), '[]')
						  FROM orch.approval_votes v
						 WHERE v.approval_id = a.approval_id AND v.decision = 'approve'))
$$;

/*
 * The engine's step for an approval step; returns what to do with it:
 * {"action": "succeed", "output"}, {"action": "wait", "wake_at"},
 * {"action": "reject" | "expire" | "human", "message"}.  When the step
 * becomes ready (first), the request is made from the run context ctx, or
 * an approval of exactly this payload, from before a redrive, applies;
 * afterwards the latest request is looked at: decided, expired (then
 * on_timeout: reject, human, or escalate once to another role), or still
 * pending.
 */
CREATE FUNCTION orch._advance_approval(p_step bigint, ctx jsonb, first boolean) RETURNS jsonb
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s		orch.steps;
	r		orch.runs;
	ws		orch.workflow_steps;
	a		orch.approvals;
	v_payload jsonb;
	v_target jsonb;
	v_evidence jsonb;
	v_hash	bytea;
	v_who	text;
BEGIN
	SELECT * INTO s FROM orch.steps WHERE step_id = p_step;
	SELECT * INTO r FROM orch.runs WHERE run_id = s.run_id;
	SELECT * INTO ws FROM orch.workflow_steps w
	 WHERE w.workflow = r.workflow AND w.version = r.version AND w.name = s.name;

	IF first THEN
		-- by default the approvers see the outputs of the steps the gate needs
		IF ws.approval_payload IS NOT NULL THEN
			v_payload := jsonb_path_query_first(ctx, ws.approval_payload, '{}', true);
		ELSE
			SELECT coalesce(jsonb_object_agg(n, ctx -> 'steps' -> n), '{}') INTO v_payload
			  FROM unnest(ws.needs) n;
		END IF;
		IF ws.approval_target IS NOT NULL THEN
			v_target := jsonb_path_query_first(ctx, ws.approval_target, '{}', true);
		END IF;
		IF ws.approval_evidence IS NOT NULL THEN
			v_evidence := jsonb_path_query_first(ctx, ws.approval_evidence, '{}', true);
		END IF;
		v_hash := sha256(convert_to(jsonb_build_array(v_payload, v_target, v_evidence)::text, 'UTF8'));

		SELECT * INTO a FROM orch.approvals WHERE step_id = p_step ORDER BY approval_id DESC LIMIT 1;
		IF FOUND AND a.status = 'approved' AND a.payload_hash = v_hash THEN
			RETURN jsonb_build_object('action', 'succeed', 'output', orch._approval_output(a));
		END IF;
		-- what was asked before is no longer what the step would do
		UPDATE orch.approvals SET status = 'superseded', decided_at = now()
		 WHERE step_id = p_step AND status = 'pending';
		INSERT INTO orch.approvals (step_id, run_id, approvers, quorum, allow_self, payload, target,
									evidence, payload_hash, expires_at)
		VALUES (p_step, s.run_id, ws.approvers, ws.quorum, ws.allow_self, v_payload, v_target,
				v_evidence, v_hash, now() + ws.timeout)
		RETURNING * INTO a;
		RETURN jsonb_build_object('action', 'wait', 'wake_at', a.expires_at);
	END IF;

	SELECT * INTO a FROM orch.approvals WHERE step_id = p_step ORDER BY approval_id DESC LIMIT 1;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'approval step % has no request', p_step;
	END IF;
	IF a.status = 'approved' THEN
		RETURN jsonb_build_object('action', 'succeed', 'output', orch._approval_output(a));
	ELSIF a.status = 'rejected' THEN
		SELECT format('%s rejected approval %s%s', v.voter, a.approval_id,
					  coalesce(': ' || v.comment, '')) INTO v_who
		  FROM orch.approval_votes v
		 WHERE v.approval_id = a.approval_id AND v.decision = 'reject'
		 ORDER BY v.voted_at LIMIT 1;
		RETURN jsonb_build_object('action', 'reject', 'message', v_who);
	ELSIF a.status = 'pending' AND a.expires_at <= now() THEN
		IF ws.on_timeout = 'escalate' AND a.escalated_from IS NULL THEN
			UPDATE orch.approvals SET status = 'escalated', decided_at = now()
			 WHERE approval_id = a.approval_id;
			INSERT INTO orch.approvals (step_id, run_id, approvers, quorum, allow_self, payload, target,
										evidence, payload_hash, expires_at, escalated_from)
			VALUES (p_step, s.run_id, ws.escalate_to, a.quorum, a.allow_self, a.payload, a.target,
					a.evidence, a.payload_hash, now() + ws.timeout, a.approval_id)
			RETURNING * INTO a;
			RETURN jsonb_build_object('action', 'wait', 'wake_at', a.expires_at);
		END IF;
		UPDATE orch.approvals SET status = 'expired', decided_at = now()
		 WHERE approval_id = a.approval_id;
		RETURN jsonb_build_object(
			'action', CASE ws.on_timeout WHEN 'human' THEN 'human' ELSE 'expire' END,
			'message', format('approval %s by %s expired at %s without a decision', a.approval_id,
							  a.approvers, a.expires_at));
	END IF;
	RETURN jsonb_build_object('action', 'wait', 'wake_at', a.expires_at);
END
$$;

-- Has the role members?  A vote is cast by a person's own role, not a group's.
CREATE FUNCTION orch._is_group_role(role name) RETURNS boolean
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT EXISTS (SELECT FROM pg_catalog.pg_auth_members m
					 JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
					WHERE g.rolname = $1)
$$;

/*
 * A vote on a pending approval request.  The run is locked first, as the
 * engine, cancel_run and other votes lock it, so votes and cancellation
 * are decided in one order.
 */
CREATE FUNCTION orch._vote(approval_id bigint, decision text, comment text, expected_hash bytea)
	RETURNS text
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	a		orch.approvals;
	r		orch.runs;
	s		orch.steps;
	who		name := orch._caller();
	is_self	boolean;
	approvals int;
BEGIN
	SELECT * INTO a FROM orch.approvals WHERE orch.approvals.approval_id = _vote.approval_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_object',
			MESSAGE = format('approval %s does not exist', _vote.approval_id);
	END IF;
	r := orch._lock_run(a.run_id);
	SELECT * INTO a FROM orch.approvals WHERE orch.approvals.approval_id = _vote.approval_id FOR UPDATE;
	SELECT * INTO s FROM orch.steps WHERE orch.steps.step_id = a.step_id;

	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = a.approvers) THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_object',
			MESSAGE = format('role "%s", the approvers of approval %s, no longer exists', a.approvers, a.approval_id),
			HINT = 'orch.resolve can retry or fail its step once it has timed out; or cancel the run.';
	END IF;
	-- a vote is a person's: not cast under a group role, which would let
	-- one member count twice
	IF orch._is_group_role(who) THEN
		RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
			MESSAGE = format('role "%s" has members: votes are cast by a person''s own role', who),
			HINT = 'RESET ROLE, or SET ROLE to your own role, before voting.';
	END IF;
	IF NOT pg_has_role(who, a.approvers, 'MEMBER') THEN
		RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
			MESSAGE = format('role "%s" may not decide approval %s', who, a.approval_id),
			DETAIL = format('Approval %s is for members of role "%s".', a.approval_id, a.approvers);
	END IF;
	IF a.status <> 'pending' OR s.status <> 'needs_approval' THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('approval %s is %s', a.approval_id,
							 CASE WHEN a.status <> 'pending' THEN a.status::text
								  ELSE format('moot: its step is %s', s.status) END),
			HINT = CASE a.status
				WHEN 'superseded' THEN 'The step asked again about a changed payload: decide the newer request in orch.pending_approvals.'
				WHEN 'escalated' THEN 'It went to another role when it expired: see orch.pending_approvals.'
				ELSE 'Only pending requests are decided.' END;
	END IF;
	IF a.expires_at <= now() THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('approval %s expired at %s', a.approval_id, a.expires_at);
	END IF;
	IF expected_hash IS NOT NULL AND expected_hash <> a.payload_hash THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('approval %s is for a different payload than the one decided on', a.approval_id),
			DETAIL = format('The request''s payload_hash is %s.', encode(a.payload_hash, 'hex')),
			HINT = 'Look at the request again in orch.pending_approvals.';
	END IF;
	is_self := who = r.owner;
	IF is_self AND decision = 'approve' AND NOT a.allow_self THEN
		RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
			MESSAGE = format('role "%s" started run %s and cannot approve its own gate', who, r.run_id),
			HINT = 'Four eyes: another member of the approvers role must approve (or the step must set allow_self_approval).';
	END IF;
	IF EXISTS (SELECT FROM orch.approval_votes v
			   WHERE v.approval_id = a.approval_id AND v.voter = who) THEN
		RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
			MESSAGE = format('role "%s" has already voted on approval %s', who, a.approval_id),
			HINT = 'A quorum needs distinct approvers.';
	END IF;

	INSERT INTO orch.approval_votes (approval_id, voter, decision, comment, self_approval, session_role)
	VALUES (a.approval_id, who, decision, comment, is_self AND decision = 'approve', session_user);
	IF decision = 'reject' THEN
		UPDATE orch.approvals SET status = 'rejected', decided_at = now()
		 WHERE orch.approvals.approval_id = a.approval_id;
	ELSE
		SELECT count(*) INTO approvals FROM orch.approval_votes v
		 WHERE v.approval_id = a.approval_id AND v.decision = 'approve';
		IF approvals < a.quorum THEN
			RETURN format('approved by %s of %s', approvals, a.quorum);
		END IF;
		UPDATE orch.approvals SET status = 'approved', decided_at = now()
		 WHERE orch.approvals.approval_id = a.approval_id;
	END IF;
	-- decided: the engine carries it out, and the run goes on
	UPDATE orch.steps SET wake_at = now() WHERE orch.steps.step_id = a.step_id;
	PERFORM orch._settle_run(r.run_id, a.step_id);
	RETURN CASE decision WHEN 'reject' THEN 'rejected' ELSE 'approved' END;
END
$$;

/*
 * Approve a pending request, as a member of its approvers role; returns
 * 'approved' once the quorum is reached, else how many have approved.
 * payload_hash, if given, must be the request's: what the approver saw.
 */
CREATE FUNCTION orch.approve(approval_id bigint, comment text DEFAULT NULL,
							 payload_hash bytea DEFAULT NULL) RETURNS text
	LANGUAGE sql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT orch._vote(approval_id, 'approve', comment, payload_hash)
$$;

-- Reject a pending request: one rejection decides it.
CREATE FUNCTION orch.reject(approval_id bigint, reason text) RETURNS text
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF reason IS NULL OR btrim(reason) = '' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('rejecting approval %s needs a reason', approval_id),
			HINT = 'The reason is kept with the vote and the run''s error.';
	END IF;
	RETURN orch._vote(approval_id, 'reject', reason, NULL);
END
$$;

/*
 * The pending requests, with what they show.  orch_reader sees them all;
 * anyone else the ones they may decide.
 */
CREATE VIEW orch.pending_approvals WITH (security_barrier) AS
SELECT a.approval_id, a.run_id, r.workflow, s.name AS step, s.step_id, a.approvers, a.quorum,
	   (SELECT pg_catalog.count(*) FROM orch.approval_votes v
		 WHERE v.approval_id = a.approval_id AND v.decision = 'approve')::int AS approvals,
	   a.payload, a.target, a.evidence, pg_catalog.encode(a.payload_hash, 'hex') AS payload_hash,
	   a.requested_at, a.expires_at, a.escalated_from, r.business_key, r.owner,
	   coalesce(x.member, false)
		 AND (a.allow_self OR r.owner <> current_user)
		 AND NOT orch._is_group_role(current_user)
		 AND NOT EXISTS (SELECT FROM orch.approval_votes v
						  WHERE v.approval_id = a.approval_id AND v.voter = current_user) AS can_approve
  FROM orch.approvals a
  JOIN orch.steps s ON s.step_id = a.step_id
  JOIN orch.runs r ON r.run_id = a.run_id
  -- whether the current role is in the approvers role (false if that role is gone)
  LEFT JOIN LATERAL (SELECT pg_catalog.pg_has_role(current_user, g.oid, 'MEMBER') AS member
					   FROM pg_catalog.pg_roles g WHERE g.rolname = a.approvers) x ON true
 WHERE a.status = 'pending' AND s.status = 'needs_approval'
   AND (pg_catalog.pg_has_role(current_user, 'orch_reader', 'MEMBER') OR coalesce(x.member, false));

/* ------------------------------------------------------------------------
 * Subworkflows: child runs
 * ------------------------------------------------------------------------ */

/*
 * Start the child run of a subworkflow step (the engine's, one per
 * attempt): the step's workflow, with the input its jsonpath selects from
 * the run context, owned by the parent's owner, with its priority, tenant,
 * business key and deadline.
 */
CREATE FUNCTION orch._start_child(p_step bigint, ctx jsonb) RETURNS uuid
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s		orch.steps;
	r		orch.runs;
	ws		orch.workflow_steps;
	v_input	jsonb;
BEGIN
	SELECT * INTO s FROM orch.steps WHERE step_id = p_step;
	SELECT * INTO r FROM orch.runs WHERE run_id = s.run_id;
	SELECT * INTO ws FROM orch.workflow_steps w
	 WHERE w.workflow = r.workflow AND w.version = r.version AND w.name = s.name;
	v_input := CASE WHEN ws.sub_input IS NULL THEN r.input
					ELSE jsonb_path_query_first(ctx, ws.sub_input) END;
	IF v_input IS NULL OR jsonb_typeof(v_input) <> 'object' THEN
		RAISE EXCEPTION USING ERRCODE = 'ORPRM',
			MESSAGE = format('the input of subworkflow step "%s" is %s, not an object',
							 s.name, coalesce(jsonb_typeof(v_input), 'missing')),
			HINT = 'Its "input" jsonpath must select an object from the run context.';
	END IF;
	RETURN orch._start_run(ws.subworkflow, v_input, NULL, r.business_key, r.priority, r.deadline,
						   r.tenant, r.owner, r.run_id, s.step_id, s.attempt + 1, NULL);
END
$$;

/*
 * The engine's step for a map step at attempt p_attempt: starts a child run
 * of the step's workflow per item of its items array (input {"item",
 * "index"}), at most max_concurrency running at once, and returns what to
 * do: {"action": "wait"}, {"action": "succeed", "output": {"results": [the
 * children's outputs in item order, null for a failed one], "failed":
 * [their indexes]}}, or {"action": "fail", "message"} once more items
 * failed than are tolerated (the children still running are cancelled).
 */
CREATE FUNCTION orch._advance_map(p_step bigint, ctx jsonb, p_attempt int) RETURNS jsonb
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	s		orch.steps;
	r		orch.runs;
	ws		orch.workflow_steps;
	items	jsonb;
	n		int;
	started	int;
	running	int;
	failed	int[];
	tolerated int;
	cancelled jsonb;
BEGIN
	SELECT * INTO s FROM orch.steps WHERE step_id = p_step;
	SELECT * INTO r FROM orch.runs WHERE run_id = s.run_id;
	SELECT * INTO ws FROM orch.workflow_steps w
	 WHERE w.workflow = r.workflow AND w.version = r.version AND w.name = s.name;
	items := jsonb_path_query_first(ctx, ws.map_items, '{}', true);
	IF items IS NULL OR jsonb_typeof(items) <> 'array' THEN
		RETURN jsonb_build_object('action', 'fail',
			'message', format('the items of map step "%s" are %s, not an array', s.name,
							  coalesce(jsonb_typeof(items), 'missing')));
	END IF;
	n := jsonb_array_length(items);
	tolerated := coalesce(ws.tolerated_failures, floor(n * ws.tolerated_pct / 100)::int);

	SELECT count(*), count(*) FILTER (WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')),
		   coalesce(array_agg(parent_item ORDER BY parent_item)
					  FILTER (WHERE status IN ('failed', 'cancelled', 'timed_out')), '{}')
	  INTO started, running, failed
	  FROM orch.runs
	 WHERE parent_step_id = p_step AND parent_attempt = p_attempt;

	IF cardinality(failed) > tolerated THEN
		SELECT coalesce(jsonb_agg(x.id), '[]') INTO cancelled
		  FROM (SELECT orch._cancel_child(c.run_id, r.run_id) AS id
				  FROM orch.runs c
				 WHERE c.parent_step_id = p_step AND c.parent_attempt = p_attempt
				   AND CASE WHEN c.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN false ELSE true END
				 ORDER BY c.run_id) x;
		RETURN jsonb_build_object('action', 'fail', 'cancelled', cancelled,
			'message', format('%s of %s items of map step "%s" failed, more than the %s tolerated (items %s)',
							  cardinality(failed), n, s.name, tolerated, array_to_string(failed, ', ')));
	END IF;

	IF started = n AND running = 0 THEN
		RETURN jsonb_build_object('action', 'succeed', 'output', jsonb_build_object(
			'results', (SELECT coalesce(jsonb_agg(CASE WHEN ch.status = 'succeeded' THEN ch.output END
												 ORDER BY ch.parent_item), '[]')
						  FROM orch.runs ch
						 WHERE ch.parent_step_id = p_step AND ch.parent_attempt = p_attempt),
			'failed', to_jsonb(failed)));
	END IF;

	WHILE running < ws.max_concurrency AND started < n LOOP
		PERFORM orch._start_run(ws.subworkflow,
								jsonb_build_object('item', items -> started, 'index', started),
								NULL, r.business_key, r.priority, r.deadline, r.tenant, r.owner,
								r.run_id, s.step_id, p_attempt, started);
		started := started + 1;
		running := running + 1;
	END LOOP;
	RETURN jsonb_build_object('action', 'wait');
END
$$;

/*
 * Cancel a run its caller has locked and found unfinished: its child runs
 * first (see orch._cancel_children), then its unfinished steps and itself,
 * with error and reason; then arm the compensation of what it did.  Returns
 * every run it cancelled.  For cancel_run and for child runs.
 */
CREATE FUNCTION orch._cancel_locked(run_id uuid, error jsonb, reason text) RETURNS SETOF uuid
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
	RETURN QUERY SELECT orch._cancel_children(_cancel_locked.run_id);
	UPDATE orch.steps s
	   SET status = 'cancelled', finished_at = now(), wake_at = NULL
	 WHERE s.run_id = _cancel_locked.run_id
	   AND s.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled', 'compensated');
	UPDATE orch.runs
	   SET status = 'cancelled', finished_at = now(), steps_left = 0,
		   reason = _cancel_locked.reason, error = _cancel_locked.error
	 WHERE orch.runs.run_id = _cancel_locked.run_id;
	PERFORM orch._compensate_next(_cancel_locked.run_id);
	RETURN NEXT _cancel_locked.run_id;
END
$$;

-- Cancel a child run of parent_run, unless it ended while we waited for it.
CREATE FUNCTION orch._cancel_child(run_id uuid, parent_run uuid) RETURNS SETOF uuid
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
	c		orch.runs;
BEGIN
	SELECT * INTO c FROM orch.runs WHERE orch.runs.run_id = _cancel_child.run_id FOR UPDATE;
	IF c.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
		RETURN;
	END IF;
	RETURN QUERY SELECT orch._cancel_locked(c.run_id,
		jsonb_build_object('cancelled_by', 'parent run', 'parent_run_id', _cancel_child.parent_run),
		c.reason);
END
$$;

/*
 * Cancel the unfinished child runs of a run, and theirs in turn, before the
 * run's own steps are touched; returns every run cancelled.
 */
CREATE FUNCTION orch._cancel_children(run_id uuid) RETURNS SETOF uuid
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	c		uuid;
BEGIN
	FOR c IN SELECT r.run_id FROM orch.runs r
			  WHERE r.parent_run_id = _cancel_children.run_id
				AND CASE WHEN r.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN false ELSE true END
			  ORDER BY r.run_id
	LOOP
		RETURN QUERY SELECT orch._cancel_child(c, _cancel_children.run_id);
	END LOOP;
END
$$;

/*
 * A child run ended: its parent step looks at it now.  The trigger never
 * waits for the parent step's row: whoever holds it (the engine advancing
 * the step, or cancelling the parent) may be waiting for this child, and
 * waiting here could close a cycle.  A wake skipped that way is not lost:
 * a waiting parent step looks at its children at least every minute.
 */
CREATE FUNCTION orch._wake_parent_step() RETURNS trigger
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF NEW.status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
		RETURN NULL;
	END IF;
	UPDATE orch.steps SET wake_at = now()
	 WHERE step_id = (SELECT p.step_id FROM orch.steps p
					   WHERE p.step_id = NEW.parent_step_id AND p.status = 'waiting'
					   FOR UPDATE SKIP LOCKED);
	PERFORM orch._wake_at_end();
	RETURN NULL;
END
$$;
-- PostgreSQL sets up a WHEN clause once for every statement that updates
-- runs' status, however many of them are child runs (usually none): the
-- clause only rules out all but child runs whose status changed, and the
-- function looks for the statuses that end a run.
CREATE TRIGGER runs_wake_parent AFTER UPDATE OF status ON orch.runs
	FOR EACH ROW
	WHEN (NEW.parent_step_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
	EXECUTE FUNCTION orch._wake_parent_step();

/*
 * Configure a circuit: consecutive failures that open it, and how long it
 * stays open before a probe.  Steps name circuits with "circuit"; a circuit
 * first named by a workflow starts with the defaults (5, 30 seconds).
 */
CREATE FUNCTION orch.define_circuit(name text, threshold int DEFAULT 5,
									cooldown interval DEFAULT '30 seconds') RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
	IF define_circuit.name IS NULL OR define_circuit.name !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('invalid circuit name "%s"', coalesce(define_circuit.name, 'NULL')),
			HINT = 'A circuit name has 1 to 63 letters, digits, underscores, dots, colons or hyphens.';
	END IF;
	IF threshold IS NULL OR threshold < 1 THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('threshold of circuit "%s" must be at least 1', define_circuit.name);
	END IF;
	IF cooldown IS NULL OR cooldown <= interval '0' THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('cooldown of circuit "%s" must be positive', define_circuit.name);
	END IF;
	INSERT INTO orch.circuits AS c (name, threshold, cooldown)
	VALUES (define_circuit.name, threshold, cooldown)
	ON CONFLICT (name) DO UPDATE
	   SET threshold = excluded.threshold, cooldown = excluded.cooldown, changed_at = now();
END
$$;

/* ------------------------------------------------------------------------
 * External task workers
 * ------------------------------------------------------------------------ */

-- Limit the tasks of a queue leased at once (NULL: no limit).
CREATE FUNCTION orch.define_queue(name text, max_running int DEFAULT NULL) RETURNS void
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
	IF define_queue.name IS NULL OR define_queue.name !~ '^[A-Za-z0-9_.:-]{1,63}$' THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('invalid queue name "%s"', coalesce(define_queue.name, 'NULL')),
			HINT = 'A queue name has 1 to 63 letters, digits, underscores, dots, colons or hyphens.';
	END IF;
	IF max_running < 1 THEN
		RAISE EXCEPTION USING ERRCODE = '22023',
			MESSAGE = format('max_running of queue "%s" must be at least 1, or NULL for no limit',
							 define_queue.name);
	END IF;
	INSERT INTO orch.queues AS q (name, max_running) VALUES (define_queue.name, max_running)
	ON CONFLICT (name) DO UPDATE SET max_running = excluded.max_running, changed_at = now();
END
$$;

-- Each queue: tasks waiting, leased, and the limit.
CREATE VIEW orch.queue_status AS
	SELECT q.queue AS name,
		   pg_catalog.count(*) FILTER (WHERE q.status = 'waiting') AS waiting,
		   pg_catalog.count(*) FILTER (WHERE q.status = 'running') AS running,
		   (SELECT l.max_running FROM orch.queues l WHERE l.name = q.queue) AS max_running
	  FROM orch.steps q
	 WHERE q.queue IS NOT NULL AND q.status IN ('waiting', 'running')
	 GROUP BY q.queue;

/*
 * A task leased to a worker, as claims return it.  The token fences the
 * worker's verdict; idempotency_key is the same for every attempt of the
 * step, and traceparent continues the run's W3C trace.
 */
CREATE TYPE orch.task_lease AS (
	token			uuid,
	run_id			uuid,
	step			text,
	input			jsonb,
	attempt			int,
	idempotency_key	text,
	traceparent		text,
	lease_expires_at timestamptz
);

/*
 * Lease up to max waiting tasks of a queue.  With nothing to claim, waits
 * up to `wait` for a commit that queues tasks.
 */
CREATE FUNCTION orch.claim_tasks(queue text, worker text, max int DEFAULT 1,
								 lease interval DEFAULT '5 minutes',
								 wait interval DEFAULT '0 seconds')
	RETURNS SETOF orch.task_lease
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_claim_tasks';

-- Renew a lease for its own length, and record progress; false if the lease
-- is no longer held (expired, or the task was cancelled).
CREATE FUNCTION orch.heartbeat_task(token uuid, progress jsonb DEFAULT NULL) RETURNS boolean
	LANGUAGE sql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
	WITH renewed AS (
		UPDATE orch.steps s
		   SET wake_at = clock_timestamp() + s.lease,
			   progress = coalesce(heartbeat_task.progress, s.progress)
		 WHERE s.step_id = orch._lease_step(heartbeat_task.token)
		   AND s.lease_token = heartbeat_task.token AND s.status = 'running'
		   AND s.wake_at > clock_timestamp()
		RETURNING 1)
	SELECT EXISTS (SELECT FROM renewed)
$$;

CREATE FUNCTION orch.complete_task(token uuid, output jsonb) RETURNS void
	LANGUAGE c
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_complete_task';

-- Several successes at once: outputs[i] for the task leased with tokens[i].
-- A token whose lease is no longer valid is reported and changes nothing;
-- the others complete together.
CREATE FUNCTION orch.complete_tasks(tokens uuid[], outputs jsonb[],
									OUT token uuid, OUT completed boolean, OUT detail text)
	RETURNS SETOF record
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_complete_tasks_sql';

/*
 * A worker's loop in one call: complete the task it holds (as
 * orch.complete_task), then lease up to max waiting tasks of the queue (as
 * orch.claim_tasks without wait), in one transaction.
 */
CREATE FUNCTION orch.complete_and_claim(done_token uuid, output jsonb, queue text, worker text,
										max int DEFAULT 1, lease interval DEFAULT '5 minutes')
	RETURNS SETOF orch.task_lease
	LANGUAGE c
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_complete_and_claim';

CREATE FUNCTION orch.fail_task(token uuid, error text, error_class text DEFAULT 'transient',
							   detail text DEFAULT NULL) RETURNS void
	LANGUAGE c
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_fail_task';

/* ------------------------------------------------------------------------
 * Views
 * ------------------------------------------------------------------------ */

-- Engine workers of this cluster, from shared memory.
CREATE FUNCTION orch._engine_workers(OUT database oid, OUT pid int, OUT started_at timestamptz,
									 OUT last_batch_at timestamptz, OUT steps_done bigint)
	RETURNS SETOF record
	LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'orch_engine_workers';

-- Each circuit: its state, when an open one lets a probe through, and the
-- steps waiting for it.
CREATE VIEW orch.circuit_status AS
	SELECT c.name, c.state, c.failures, c.threshold, c.cooldown, c.opened_at,
		   CASE WHEN c.state = 'open' THEN c.opened_at + c.cooldown END AS probe_after,
		   (SELECT pg_catalog.count(*) FROM orch.steps s
			 WHERE s.status = 'blocked' AND s.circuit = c.name) AS blocked_steps,
		   c.changed_at
	  FROM orch.circuits c;

CREATE VIEW orch.engine_workers AS
	SELECT d.datname AS database, w.pid, w.started_at, w.last_batch_at, w.steps_done
	  FROM orch._engine_workers() w
	  LEFT JOIN pg_catalog.pg_database d ON d.oid = w.database;

/* ------------------------------------------------------------------------
 * The audit trail (docs/audit.md)
 * ------------------------------------------------------------------------ */

-- The audit trail is one event per row changed in an audited table (and
-- per audit event): who, what, when and why, and a SHA-256 of the event's
-- canonical encoding.  An event's row images and its run and step are
-- stored in that encoding, so the values hashed are the values stored.
-- The events of one transaction (up to 1,000) share a record, written when
-- it commits, which holds what the events of each statement have in common
-- once; orch.audit_log shows one row per event.
-- Append-only; the sealer chains finished events into orch.audit_blocks.
CREATE TABLE orch.audit_records (
	record_id		bigint		GENERATED ALWAYS AS IDENTITY (CACHE 64),
	xid				xid8		NOT NULL,	-- the writing (top-level) transaction
	at				timestamptz	NOT NULL,	-- when its first statement was recorded
	n_events		int			NOT NULL,
	events			bytea		NOT NULL,	-- its statements: who, when, why, then their events
	hashes			bytea		NOT NULL,	-- each event's row_hash, 32 bytes
	run_ids			uuid[],					-- the runs of its events, to find them by
	purge			boolean		NOT NULL DEFAULT false,	-- holds a purge's event
	-- the order in which the sealer takes events: transaction, record, event
	PRIMARY KEY (xid, record_id)
);
-- Without a pending list: a record's runs go straight into the index.  A
-- pending list is cheaper for the writer, but merging it (by the sealer)
-- cost more than the writers saved, and run ids of UUID version 7 keep
-- the direct inserts near one edge of the index.
CREATE INDEX audit_records_runs ON orch.audit_records USING gin (run_ids) WITH (fastupdate = off);
-- the purges, which verification looks up first
CREATE INDEX audit_records_purges ON orch.audit_records (record_id) WHERE purge;
-- A record's events repeat their column names and its statements their
-- who and why: they compress well, and the extension compresses them
-- (with the column's method) from 256 bytes on, where PostgreSQL would
-- start only in rows past 2 kB.
-- Hashes do not compress at all, and run ids little (lz4, which gives up
-- quickly, instead of the default pglz).
-- A record is moved out of line only past 8,160 bytes, compressed: the
-- record of a claim of ten tasks and their verdicts (40 events) then stays
-- in its row, with no insert into the TOAST table and its index.
ALTER TABLE orch.audit_records ALTER COLUMN events SET COMPRESSION lz4,
	ALTER COLUMN hashes SET STORAGE EXTERNAL,
	ALTER COLUMN run_ids SET COMPRESSION lz4,
	SET (toast_tuple_target = 8160);

-- A block seals the rows of the transactions with xid_from <= xid < xid_to,
-- all of which had ended when it was sealed.  It lists them by record (the
-- rows of record r are r * 1,000 + 0, 1, ...) and keeps a 16-byte tag of
-- each one's hash, which names a row that changed; its Merkle root is over
-- the full hashes, which verification recomputes from the rows.
CREATE TABLE orch.audit_blocks (
	block_id		bigint		PRIMARY KEY,
	xid_from		xid8		NOT NULL,
	xid_to			xid8		NOT NULL,
	sealed_at		timestamptz	NOT NULL,
	n_rows			bigint		NOT NULL,
	record_ids		bigint[]	NOT NULL,	-- the records of the rows, in (xid, record_id) order
	record_rows		int[]		NOT NULL,	-- how many rows (events) each of them holds
	row_tags		bytea		NOT NULL,	-- each row's row_hash cut to 16 bytes, in that order
	merkle_root		bytea		NOT NULL,	-- RFC 6962 over the rows' full row_hash values
	system_identifier numeric	NOT NULL,	-- the cluster's, as pg_control_system() shows it
	timeline		int			NOT NULL,
	prev_hash		bytea		NOT NULL,	-- the block before's block_hash; 32 zero bytes for block 1
	block_hash		bytea		NOT NULL
);
CREATE INDEX audit_blocks_xid ON orch.audit_blocks (xid_to);
-- A block's tags are stored out of line uncompressed: they do not compress.
ALTER TABLE orch.audit_blocks ALTER COLUMN row_tags SET STORAGE EXTERNAL;

CREATE FUNCTION orch._audit() RETURNS trigger
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'orch_audit_trigger';

CREATE FUNCTION orch._audit_append_only() RETURNS trigger
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'orch_audit_append_only';

CREATE FUNCTION orch._audit_event(table_name text, operation text, detail jsonb) RETURNS void
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'orch_audit_event';

-- The events of a record, with their statements' who, when and why, their
-- row images as jsonb.
CREATE FUNCTION orch._audit_unpack(record_id bigint, n_events int, events bytea, hashes bytea,
								   OUT audit_id bigint, OUT at timestamptz, OUT table_name text,
								   OUT operation text, OUT row_key jsonb, OUT old_row jsonb,
								   OUT new_row jsonb, OUT actor text, OUT db_user text,
								   OUT session_role text, OUT run_id uuid, OUT step_id bigint,
								   OUT reason text, OUT row_hash bytea)
	RETURNS SETOF record
	LANGUAGE c IMMUTABLE STRICT
	AS 'MODULE_PATHNAME', 'orch_audit_unpack';

-- One row per event: the audit trail as the sealer and the verifiers see
-- it.  An event's audit_id is its record's record_id times 1,000 plus its
-- place in the record (0 to 999).
CREATE VIEW orch.audit_log AS
	SELECT e.audit_id, r.xid, e.at, e.table_name, e.operation, e.row_key, e.old_row, e.new_row,
		   e.actor, e.db_user, e.session_role, e.run_id, e.step_id, e.reason, e.row_hash,
		   r.record_id
	  FROM orch.audit_records r
	 CROSS JOIN LATERAL orch._audit_unpack(r.record_id, r.n_events, r.events, r.hashes) e;

-- UPDATE, DELETE and TRUNCATE of the audit tables are refused for every
-- role, whatever session_replication_role says.
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON orch.audit_records
	FOR EACH STATEMENT EXECUTE FUNCTION orch._audit_append_only();
ALTER TABLE orch.audit_records ENABLE ALWAYS TRIGGER audit_records_append_only;
CREATE TRIGGER audit_blocks_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON orch.audit_blocks
	FOR EACH STATEMENT EXECUTE FUNCTION orch._audit_append_only();
ALTER TABLE orch.audit_blocks ENABLE ALWAYS TRIGGER audit_blocks_append_only;

-- The audit triggers of a table: one per operation, since a trigger with
-- transition tables serves one event; they fire ALWAYS.
CREATE FUNCTION orch._create_audit_triggers(tbl regclass, own boolean) RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	arg text := CASE WHEN own THEN '''own''' ELSE '' END;
BEGIN
	EXECUTE format('CREATE TRIGGER orch_audit_insert AFTER INSERT ON %s'
				   ' REFERENCING NEW TABLE AS orch_audit_new'
				   ' FOR EACH STATEMENT EXECUTE FUNCTION orch._audit(%s)', tbl, arg);
	EXECUTE format('CREATE TRIGGER orch_audit_update AFTER UPDATE ON %s'
				   ' REFERENCING OLD TABLE AS orch_audit_old NEW TABLE AS orch_audit_new'
				   ' FOR EACH STATEMENT EXECUTE FUNCTION orch._audit(%s)', tbl, arg);
	EXECUTE format('CREATE TRIGGER orch_audit_delete AFTER DELETE ON %s'
				   ' REFERENCING OLD TABLE AS orch_audit_old'
				   ' FOR EACH STATEMENT EXECUTE FUNCTION orch._audit(%s)', tbl, arg);
	EXECUTE format('CREATE TRIGGER orch_audit_truncate AFTER TRUNCATE ON %s'
				   ' FOR EACH STATEMENT EXECUTE FUNCTION orch._audit(%s)', tbl, arg);
	EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orch_audit_insert,'
				   ' ENABLE ALWAYS TRIGGER orch_audit_update, ENABLE ALWAYS TRIGGER orch_audit_delete,'
				   ' ENABLE ALWAYS TRIGGER orch_audit_truncate', tbl);
END
$$;

-- The orchestrator's own tables are always audited.
SELECT orch._create_audit_triggers(t, true)
  FROM unnest(ARRAY['orch.workflows', 'orch.workflow_steps', 'orch.retry_policies',
					'orch.queues', 'orch.circuits', 'orch.runs', 'orch.steps',
					'orch.attempts', 'orch.events', 'orch.approvals',
					'orch.approval_votes']::regclass[]) t;

-- Drop the audit triggers a table has.
CREATE FUNCTION orch._drop_audit_triggers(tbl regclass) RETURNS void
	LANGUAGE plpgsql
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	t name;
BEGIN
	FOR t IN SELECT tgname FROM pg_catalog.pg_trigger
			  WHERE tgrelid = tbl
				AND tgname IN ('orch_audit_insert', 'orch_audit_update', 'orch_audit_delete',
							   'orch_audit_truncate') LOOP
		EXECUTE format('DROP TRIGGER %I ON %s', t, tbl);
	END LOOP;
END
$$;

-- A table's schema-qualified name, as audit rows name it.
CREATE FUNCTION orch._table_name(tbl regclass) RETURNS text
	LANGUAGE sql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT format('%I.%I', n.nspname, c.relname)
	  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
	 WHERE c.oid = tbl
$$;

-- Is the table given to orch.enable_audit or orch.disable_audit one whose
-- audit the caller may change?  Raises if not.
CREATE FUNCTION orch._check_audit_target(tbl regclass, what text) RETURNS void
	LANGUAGE plpgsql STABLE
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	c record;
BEGIN
	SELECT r.relkind, n.nspname INTO c
	  FROM pg_catalog.pg_class r JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace
	 WHERE r.oid = tbl;
	IF c.nspname = 'orch' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('%s is one of the orchestrator''s own tables, which are always audited',
							 orch._table_name(tbl));
	END IF;
	IF c.relkind = 'p' THEN
		-- statement triggers on a partitioned table do not fire for
		-- statements aimed at one of its partitions
		RAISE EXCEPTION USING ERRCODE = 'wrong_object_type',
			MESSAGE = format('cannot %s the audit of %s: it is a partitioned table', what,
							 orch._table_name(tbl)),
			HINT = 'Audit each partition: a change aimed at a partition does not fire its parent''s triggers.';
	END IF;
	IF c.relkind <> 'r' THEN
		RAISE EXCEPTION USING ERRCODE = 'wrong_object_type',
			MESSAGE = format('cannot %s the audit of %s: it is not a table', what, orch._table_name(tbl)),
			HINT = 'Only tables are audited.';
	END IF;
	-- auditing a table lets orch_reader see its changes: it takes the
	-- right to read it as well as to put triggers on it
	IF NOT (pg_catalog.has_table_privilege(orch._caller(), tbl, 'TRIGGER')
			AND pg_catalog.has_table_privilege(orch._caller(), tbl, 'SELECT')) THEN
		RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
			MESSAGE = format('permission denied to %s the audit of %s', what, orch._table_name(tbl)),
			HINT = 'It takes the TRIGGER and SELECT privileges on the table.';
	END IF;
END
$$;

-- Audit a business table: every INSERT, UPDATE, DELETE and TRUNCATE of it
-- from now on is recorded; a change made by a sql step carries the step.
CREATE FUNCTION orch.enable_audit(tbl regclass) RETURNS boolean
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	pk text[];
BEGIN
	PERFORM orch._check_audit_target(tbl, 'enable');
	IF (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger
		 WHERE tgrelid = tbl AND tgenabled = 'A'
		   AND tgname IN ('orch_audit_insert', 'orch_audit_update', 'orch_audit_delete',
						  'orch_audit_truncate')) = 4 THEN
		RETURN false;	-- already audited
	END IF;
	-- triggers left from before, some disabled or dropped by hand: anew
	PERFORM orch._drop_audit_triggers(tbl);
	SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.i) INTO pk
	  FROM pg_catalog.pg_index x
	  CROSS JOIN LATERAL pg_catalog.unnest(x.indkey) WITH ORDINALITY AS k(attnum, i)
	  JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
	 WHERE x.indrelid = tbl AND x.indisprimary;
	IF pk IS NULL THEN
		RAISE WARNING '% has no primary key: its audit rows will have no row_key',
			orch._table_name(tbl)
			USING HINT = 'Without a key, the changes of a row can be told apart only by their old and new values.';
	END IF;
	PERFORM orch._create_audit_triggers(tbl, false);
	PERFORM orch._audit_event(orch._table_name(tbl), 'ENABLE_AUDIT',
							  pg_catalog.jsonb_build_object('primary_key', pk));
	RETURN true;
END
$$;

-- Stop auditing a business table; the stop is itself recorded.
CREATE FUNCTION orch.disable_audit(tbl regclass) RETURNS boolean
	LANGUAGE plpgsql
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM orch._check_audit_target(tbl, 'disable');
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger
					WHERE tgrelid = tbl AND tgname = 'orch_audit_insert') THEN
		RETURN false;	-- not audited
	END IF;
	PERFORM orch._drop_audit_triggers(tbl);
	PERFORM orch._audit_event(orch._table_name(tbl), 'DISABLE_AUDIT', NULL);
	RETURN true;
END
$$;

-- The application's actor and reason for the changes of this transaction.
CREATE FUNCTION orch.set_audit_context(actor text, reason text DEFAULT NULL) RETURNS void
	LANGUAGE sql
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_catalog.set_config('orchestrator.audit_actor', COALESCE(actor, ''), true),
		   pg_catalog.set_config('orchestrator.audit_reason', COALESCE(reason, ''), true);
$$;

CREATE FUNCTION orch.seal_audit(heartbeat boolean DEFAULT false) RETURNS bigint
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_seal_audit';

CREATE FUNCTION orch.verify_audit(digest jsonb DEFAULT NULL,
								  OUT block_id bigint, OUT audit_id bigint, OUT finding text,
								  OUT detail text)
	RETURNS SETOF record
	LANGUAGE c
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_verify_audit';

CREATE FUNCTION orch.verify_run(run_id uuid,
								OUT block_id bigint, OUT audit_id bigint, OUT finding text,
								OUT detail text)
	RETURNS SETOF record
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_verify_run';

CREATE FUNCTION orch.purge_audit(before timestamptz) RETURNS bigint
	LANGUAGE c STRICT
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
	AS 'MODULE_PATHNAME', 'orch_purge_audit';

-- The latest block, to keep outside the database: verify_audit(digest)
-- then tells whether the chain still holds that block unchanged.
CREATE FUNCTION orch.audit_digest() RETURNS jsonb
	LANGUAGE sql STABLE
	SECURITY DEFINER
	SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_catalog.jsonb_build_object(
			 'database', pg_catalog.current_database(),
			 'system_identifier', b.system_identifier::text,
			 'timeline', b.timeline,
			 'block_id', b.block_id,
			 'xid_to', b.xid_to::text,
			 'sealed_at', pg_catalog.to_char(b.sealed_at AT TIME ZONE 'UTC',
											  'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
			 'block_hash', pg_catalog.encode(b.block_hash, 'hex'))
	  FROM orch.audit_blocks b
	 ORDER BY b.block_id DESC
	 LIMIT 1
$$;

-- One row per audited change or event, who/what/when/why flattened, with
-- the block that sealed it (NULL until sealed).
CREATE VIEW orch.audit_events AS
	SELECT l.audit_id, l.at, l.xid, l.table_name, l.operation, l.row_key,
		   CASE WHEN l.operation = 'UPDATE'
				THEN ARRAY(SELECT pg_catalog.jsonb_object_keys(l.new_row) ORDER BY 1) END
			 AS changed_columns,
		   l.old_row, l.new_row, l.actor, l.db_user, l.session_role, l.run_id, l.step_id,
		   l.reason, b.block_id
	  FROM orch.audit_log l
	  LEFT JOIN LATERAL (SELECT b0.block_id FROM orch.audit_blocks b0
						  WHERE b0.xid_to > l.xid AND b0.xid_from <= l.xid
						  ORDER BY b0.xid_to LIMIT 1) b ON true;

-- How far sealing has got: the last block, and the oldest row not sealed.
CREATE VIEW orch.audit_seal_status AS
	SELECT b.block_id AS last_block, b.sealed_at AS last_sealed_at,
		   b.xid_to AS sealed_below_xid, u.unsealed_rows, u.oldest_unsealed_at,
		   pg_catalog.now() - u.oldest_unsealed_at AS seal_lag
	  FROM (SELECT NULL) dummy
	  LEFT JOIN LATERAL (SELECT * FROM orch.audit_blocks ORDER BY block_id DESC LIMIT 1) b ON true
	  CROSS JOIN LATERAL (
		SELECT COALESCE(pg_catalog.sum(r.n_events), 0)::bigint AS unsealed_rows,
			   pg_catalog.min(r.at) AS oldest_unsealed_at
		  FROM orch.audit_records r
		 WHERE r.xid >= COALESCE(b.xid_to, '0'::xid8)) u;

SELECT pg_catalog.pg_extension_config_dump('orch.audit_records', '');
SELECT pg_catalog.pg_extension_config_dump('orch.audit_blocks', '');
SELECT pg_catalog.pg_extension_config_dump(
	pg_catalog.pg_get_serial_sequence('orch.audit_records', 'record_id')::pg_catalog.regclass, '');

/* ------------------------------------------------------------------------
 * Privileges
 * ------------------------------------------------------------------------ */
REVOKE ALL ON ALL TABLES IN SCHEMA orch FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA orch FROM PUBLIC;
GRANT USAGE ON SCHEMA orch TO orch_reader, orch_worker;
GRANT SELECT ON orch.workflows, orch.workflow_steps, orch.retry_policies, orch.circuits,
	orch.circuit_status, orch.queues, orch.queue_status, orch.runs, orch.steps, orch.attempts,
	orch.engine_workers, orch.human_queue, orch.events TO orch_reader;
GRANT EXECUTE ON FUNCTION orch.define_workflow(text, jsonb),
	orch.define_retry_policy(text, jsonb), orch.define_circuit(text, int, interval),
	orch.define_queue(text, int) TO orch_admin;
GRANT EXECUTE ON FUNCTION orch.start_run(text, jsonb, text, text, int, timestamptz, text),
	orch.cancel_run(uuid, text), orch.pause_run(uuid, text), orch.resume_run(uuid, text),
	orch.retry_run(uuid, text), orch.resolve(bigint, text, jsonb, text),
	orch.send_event(uuid, text, jsonb), orch.send_event_by_key(text, text, text, jsonb),
	orch.wait_run(uuid, interval) TO orch_operator;
GRANT EXECUTE ON FUNCTION orch.tick(int) TO orch_admin;
GRANT EXECUTE ON FUNCTION orch.claim_tasks(text, text, int, interval, interval),
	orch.heartbeat_task(uuid, jsonb), orch.complete_task(uuid, jsonb),
	orch.complete_tasks(uuid[], jsonb[]), orch.fail_task(uuid, text, text, text),
	orch.complete_and_claim(uuid, jsonb, text, text, int, interval) TO orch_worker;
GRANT EXECUTE ON FUNCTION orch._engine_workers() TO orch_reader;
GRANT SELECT ON orch.audit_events, orch.audit_blocks, orch.audit_seal_status TO orch_reader;
-- orch.audit_events reads the records through orch.audit_log, which calls it
GRANT EXECUTE ON FUNCTION orch._audit_unpack(bigint, int, bytea, bytea) TO orch_reader;
GRANT EXECUTE ON FUNCTION orch.verify_audit(jsonb), orch.verify_run(uuid),
	orch.audit_digest() TO orch_reader;
GRANT EXECUTE ON FUNCTION orch.enable_audit(regclass), orch.disable_audit(regclass),
	orch.seal_audit(boolean), orch.purge_audit(timestamptz) TO orch_admin;
GRANT EXECUTE ON FUNCTION orch.set_audit_context(text, text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION orch.validate_json(jsonb, jsonb) TO PUBLIC;
-- approval rights come from membership in the role a gate names
GRANT USAGE ON SCHEMA orch TO PUBLIC;
GRANT EXECUTE ON FUNCTION orch.approve(bigint, text, bytea), orch.reject(bigint, text),
	orch._is_group_role(name) TO PUBLIC;
GRANT SELECT ON orch.pending_approvals TO PUBLIC;
GRANT SELECT ON orch.approvals, orch.approval_votes TO orch_reader;

-- Let the launcher start this database's engine as soon as we commit.
SELECT orch._launcher_wake_on_commit();
