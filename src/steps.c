/*-------------------------------------------------------------------------
 * steps.c
 *	  One batch of the engine: claim due steps with FOR UPDATE SKIP LOCKED,
 *	  advance each one through its state machine, and record the results.
 *
 *	  Everything a batch does commits or aborts together: a sql step's
 *	  effect, its new status, its attempt row and the readiness of the steps
 *	  that need it.  Each step function runs in its own subtransaction, so a
 *	  step that raises is rolled back alone and recorded as a failed attempt
 *	  while the rest of the batch goes on.  A sql step is therefore never
 *	  seen "running" by anyone else: a worker that dies mid-batch leaves the
 *	  step ready, and its effect unapplied, for the next batch.
 *
 *	  Claiming locks the run row as well as the step row, so the steps of one
 *	  run are advanced by one worker at a time and cancel_run, which locks the
 *	  run first, either waits for the batch or is seen by it.
 *
 *	  A batch claims again, in the same transaction, the steps that its own
 *	  completions made ready, up to orchestrator.batch_size steps: a chain of
 *	  sql steps then costs one commit, not one per step.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "executor/spi_priv.h"
#include "miscadmin.h"
#include "optimizer/planner.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/jsonpath.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/uuid.h"

#include "orchestrator.h"
#include "audit.h"

/* A claimed step, copied out of SPI memory. */
typedef struct ClaimedStep
{
	int64		step_id;
	Datum		run_id;			/* uuid */
	char	   *name;
	char	   *status;
	int			attempt;		/* attempts made so far */
	int			needs_ok;
	int			n_needs;
	char	   *kind;
	Oid			function;
	char	   *function_name;
	Datum		guard;			/* jsonpath, or 0 */
	Interval   *sleep_for;
	Datum		sleep_until;	/* jsonpath, or 0 */
	int			max_attempts;
	Interval   *initial_interval;
	double		backoff_coefficient;
	Interval   *max_interval;
	bool		jitter;
	Interval   *timeout;
	Interval   *schedule_to_close;	/* cap over all attempts, or NULL */
	int			attempt_base;	/* attempts before the last redrive */
	TimestampTz started_at;		/* first attempt of this series, or 0 */
	TimestampTz attempt_started_at; /* a task's current lease began, or 0 */
	char	   *worker;			/* a task's current worker, or NULL */
	char	   *circuit;		/* the circuit guarding the step, or NULL */
	char	   *circuit_state;	/* closed, open, half_open (at claim time) */
	int			circuit_failures;
	TimestampTz circuit_probe_after;	/* when an open circuit lets a probe through */
	Interval   *schedule_to_start;	/* a task's longest wait in its queue, or NULL */
	Datum		non_retryable;	/* text[], or 0 */
	Datum		dependents;		/* text[] */
	char	   *run_status;
	char	   *owner;
	Datum		ctx;			/* jsonb, or 0 */
	TimestampTz wake_at;
	char	   *phase;			/* NULL: run the step; "verify"; "compensate" */
	bool		idempotent;		/* a task whose lost lease may be retried */
	Oid			verify;			/* decides an unknown outcome, or InvalidOid */
	char	   *verify_name;
	Oid			compensate;		/* undoes the step, or InvalidOid */
	char	   *compensate_name;
	Datum		on_error;		/* jsonb rules, or 0 */
	Datum		routes;			/* text[]: the steps on_error goes to */
	bool		route_target;	/* runs only when the run is routed to it */
	int			compensations;	/* tries of its compensation so far */
	Datum		lease_token;	/* uuid, or 0 */
	Datum		resolution;		/* jsonb: a human's decision (phase "resolve"), or 0 */
	char	   *event;			/* wait_event: the name of the event it waits for */
	char	   *on_timeout;		/* wait_event: fail, skip or human */
	Datum		input_schema;	/* jsonb, or 0 */
	Datum		output_schema;	/* jsonb, or 0 */
	Datum		review_if;		/* jsonpath, or 0 */
} ClaimedStep;

/* orchestrator's own SQLSTATEs: error classes a step chooses, and its own errors */
#define ERRCODE_ORCH_TRANSIENT			MAKE_SQLSTATE('O','R','T','R','N')
#define ERRCODE_ORCH_PERMANENT			MAKE_SQLSTATE('O','R','P','R','M')
#define ERRCODE_ORCH_UNKNOWN_OUTCOME	MAKE_SQLSTATE('O','R','U','N','K')
#define ERRCODE_ORCH_INVALID			MAKE_SQLSTATE('O','R','V','A','L')	/* failed validation */
#define ERRCODE_ORCH_TIMED_OUT			MAKE_SQLSTATE('O','R','T','M','O')	/* no event in time */

/* A function the engine calls for a step: the step's own, verify, compensate. */
typedef struct StepCall
{
	Oid			fn;
	const char *fn_name;
	const char *role;			/* "function", "verify", "compensate" */
} StepCall;

/* saved plans, prepared once per process */
enum
{
	P_CANDIDATES,
	P_CANDIDATES_AFTER,
	P_CLAIM,
	P_FINISH,
	P_DEFER,
	P_ATTEMPT,
	P_PROPAGATE,
	P_RUNS,
	P_FINISH_1,
	P_DEFER_1,
	P_ATTEMPT_1,
	P_PROPAGATE_1,
	P_RUNS_1,
	P_RUN_FAIL,
	P_RUN_CANCEL_STEPS,
	P_RUN_NEEDS_HUMAN,
	P_CIRCUIT_PROBE,
	P_CIRCUIT_CLOSE,
	P_CIRCUIT_FAIL,
	P_DEADLINES,
	P_NEXT_TIMER,
	P_ROUTE,
	P_SET_CAUSE,
	P_STEP_SET,
	P_COMPENSATE_NEXT,
	P_TAKE_EVENT,
	P_APPROVAL,
	P_RUN_NEEDS_APPROVAL,
	P_RUN_APPROVAL_DONE,
	P_START_CHILD,
	P_CHILD,
	P_CANCEL_CHILDREN,
	P_MAP,
	P_COUNT
};

static SPIPlanPtr plans[P_COUNT];

/*
 * Runs that failed earlier in the current batch: their other claimed steps
 * were cancelled with them and must not be advanced.  Batch-scoped.
 */
static List *failed_runs = NIL;

/*
 * Circuits that opened during the current batch, with when they let a probe
 * through: steps claimed before that must not run.  Batch-scoped.
 */
typedef struct OpenedCircuit
{
	char	   *name;
	TimestampTz probe_after;
} OpenedCircuit;
static List *opened_circuits = NIL;

/*
 * The step the current (or last) batch advanced last, or 0: when a batch
 * fails outside any step's subtransaction, the engine blames this step if
 * the batch had only one.
 */
int64		orch_last_step_id = 0;

/* the earliest timer the current batch set (0: none) */
static TimestampTz batch_min_timer = 0;
static MemoryContext batch_cxt = NULL;	/* non-NULL while a batch runs */

/*
 * The steps the batch's own writes made ready (their needs counted down to
 * zero), which its next claim round takes first, by key: a batch follows
 * the runs it took instead of leaving their next steps behind every step
 * already due.  follow_total counts them over the batch.
 */
static Datum *followers = NULL;
static int	nfollowers = 0;
static int	maxfollowers = 0;
static int	follow_total = 0;

/* steps made ready some other way (compensations, children): claim in order */
static bool ready_elsewhere = false;

/*
 * The bookkeeping of a claim round is written set-wise: each outcome is
 * buffered as a row, and one statement per kind writes all rows from arrays
 * (unnest) when the round ends, or earlier when a write must not wait (a
 * run failing).  Executor start-up is then paid per round, not per step.
 */
/* what the state machine needs of a step, its run and its definition */
#define STEP_SELECT(first, lock) STEP_COLUMNS(STEP_CONTEXT) STEP_FROM(first, lock)
#define STEP_NCOLS 52			/* the columns of STEP_COLUMNS */
#define STEP_COLUMNS(context) \
	"SELECT s.step_id, s.run_id, s.name, s.status::pg_catalog.text, s.attempt, s.needs_ok," \
	"       pg_catalog.cardinality(ws.needs), ws.kind, ws.function::pg_catalog.oid," \
	"       ws.function_name, ws.guard, ws.sleep_for, ws.sleep_until, ws.max_attempts," \
	"       ws.initial_interval, ws.backoff_coefficient, ws.max_interval, ws.jitter," \
	"       ws.timeout, ws.non_retryable, ws.dependents, r.status::pg_catalog.text," \
	"       r.owner::pg_catalog.text," \
	context "," \
	"       s.wake_at, ws.schedule_to_close, s.attempt_base, s.started_at," \
	"       s.attempt_started_at, s.worker, ws.circuit, c.state, c.failures," \
	"       c.opened_at + c.cooldown, ws.schedule_to_start, s.phase, ws.idempotent," \
	"       ws.verify::pg_catalog.oid, ws.verify_name, ws.compensate::pg_catalog.oid," \
	"       ws.compensate_name, ws.on_error, ws.routes, ws.route_target, s.compensations," \
	"       s.lease_token, s.resolution, ws.event, ws.on_timeout, ws.input_schema," \
	"       ws.output_schema, ws.review_if"
/* the run context a step's function, guard or until sees */
#define STEP_CONTEXT \
	"       CASE WHEN ws.kind = 'sql' OR ws.guard IS NOT NULL OR ws.sleep_until IS NOT NULL" \
	"              OR s.phase IS NOT NULL OR ws.input_schema IS NOT NULL" \
	"              OR ws.kind IN ('approval', 'subworkflow', 'map') THEN" \
	"         pg_catalog.jsonb_build_object(" \
	"           'run_id', r.run_id, 'workflow', r.workflow, 'version', r.version," \
	"           'step', s.name," \
	"           'attempt', CASE s.phase WHEN 'verify' THEN s.attempt" \
	"                                   WHEN 'compensate' THEN s.compensations + 1" \
	"                                   ELSE s.attempt + 1 END," \
	"           'input', r.input, 'business_key', r.business_key," \
	"           'steps', " ORCH_STEP_OUTPUTS_SQL("s.run_id") ")" \
	"         || CASE WHEN s.phase = 'verify' THEN pg_catalog.jsonb_build_object('error', s.error)" \
	"                 WHEN s.phase = 'compensate' THEN pg_catalog.jsonb_build_object(" \
	"                   'output', s.output, 'run_status', r.status, 'run_error', r.error)" \
	"                 WHEN s.cause IS NOT NULL THEN pg_catalog.jsonb_build_object('error', s.cause)" \
	"                 ELSE '{}'::pg_catalog.jsonb END" \
	"       END"

/*
 * The steps (first: how they are found), then for each its run, definition
 * and circuit, looked up by primary key.  Each lookup is a LATERAL subquery
 * ordered by its key, which fixes the plan whatever the statistics say: the
 * tables change completely within seconds, and an ANALYZE that ran while a
 * big start_run transaction was open describes orch.steps as empty.  A
 * lookup by key is then the only plan without a sort (sorts are off for the
 * engine's statements), and the LATERAL reference fixes the join order.
 *
 * Each locked row is locked inside its own subquery: the run by lock here,
 * the step by the same clause given to STEPS_BY in first.  A
 * locking clause on the whole statement would lock the same rows, but also
 * carry a copy of every joined row through the plan, for a recheck that
 * nothing here needs.  The subqueries name only the columns used, which
 * keeps every node of the plan narrow.
 */
#define STEP_FROM(first, lock) \
	first \
	"  CROSS JOIN LATERAL (SELECT r0.run_id, r0.workflow, r0.version, r0.status, r0.owner," \
	"                             r0.input, r0.business_key, r0.error" \
	"                        FROM orch.runs r0 WHERE r0.run_id = s.run_id" \
	"                       ORDER BY r0.run_id OFFSET 0 " lock ") r" \
	"  CROSS JOIN LATERAL (SELECT w0.needs, w0.kind, w0.function, w0.function_name, w0.guard," \
	"                             w0.sleep_for, w0.sleep_until, w0.max_attempts, w0.initial_interval," \
	"                             w0.backoff_coefficient, w0.max_interval, w0.jitter, w0.timeout," \
	"                             w0.non_retryable, w0.dependents, w0.schedule_to_close, w0.circuit," \
	"                             w0.schedule_to_start, w0.idempotent, w0.verify, w0.verify_name," \
	"                             w0.compensate, w0.compensate_name, w0.on_error, w0.routes," \
	"                             w0.route_target, w0.event, w0.on_timeout, w0.input_schema," \
	"                             w0.output_schema, w0.review_if" \
	"                        FROM orch.workflow_steps w0" \
	"                       WHERE w0.workflow = r.workflow AND w0.version = r.version" \
	"                         AND w0.name = s.name" \
	"                       ORDER BY w0.workflow, w0.version, w0.name OFFSET 0) ws" \
	"  LEFT JOIN LATERAL (SELECT c0.state, c0.failures, c0.opened_at, c0.cooldown" \
	"                       FROM orch.circuits c0 WHERE c0.name = ws.circuit" \
	"                      ORDER BY c0.name OFFSET 0) c ON true"

/* the step columns the statements above read */
#define STEP_COLS \
	"SELECT s0.step_id, s0.run_id, s0.name, s0.status, s0.attempt, s0.needs_ok, s0.wake_at," \
	"       s0.attempt_base, s0.started_at, s0.attempt_started_at, s0.worker, s0.phase," \
	"       s0.compensations, s0.lease_token, s0.resolution, s0.output, s0.error, s0.cause"

/* steps by a key: an array of ids, in the array's order */
#define STEPS_BY(array, column, lock) \
	" FROM pg_catalog.unnest(" array ") AS k(key)" \
	"  CROSS JOIN LATERAL (" STEP_COLS \
	"                        FROM orch.steps s0 WHERE s0." column " = k.key" \
	"                       ORDER BY s0." column " OFFSET 0 " lock ") s"

/* rows from arrays, one element each: u(columns) */
#define UNNEST_FROM(arrays, columns) "  FROM unnest(" arrays ") AS u(" columns ")"

/* steps that finished: succeeded, skipped, failed ($7: the time) */
#define FINISH_SQL(from, id, status, output, error, attempt, finished_at) \
	"UPDATE orch.steps s" \
	"   SET status = " status "::orch.step_status, output = " output ", error = " error "," \
	"       attempt = " attempt ", started_at = COALESCE(s.started_at, $7)," \
	"       finished_at = " finished_at ", wake_at = NULL, lease_token = NULL, phase = NULL" \
	from \
	" WHERE s.step_id = " id " AND s.status <> 'cancelled'"

/* steps that wait for a time: sleeping, retrying, parked ($7: the time) */
#define DEFER_SQL(from, id, status, wake_at, attempt, error, phase) \
	"UPDATE orch.steps s" \
	"   SET status = " status "::orch.step_status, wake_at = " wake_at ", attempt = " attempt "," \
	"       error = COALESCE(" error ", s.error), lease_token = NULL, phase = " phase "," \
	"       started_at = CASE WHEN " status " IN ('waiting', 'retrying', 'needs_human')" \
	"                         THEN COALESCE(s.started_at, $7) ELSE s.started_at END" \
	from \
	" WHERE s.step_id = " id " AND s.status <> 'cancelled'"

#define ATTEMPT_SQL(rows) \
	"INSERT INTO orch.attempts (step_id, attempt, run_id, worker, started_at, finished_at," \
	"                           outcome, error_class, sqlstate, message, detail, hint, context," \
	"                           kind) " \
	rows

/* n needs of (run, step) finished, ok of them succeeded */
#define PROPAGATE_SQL(from, run, name, n, ok) \
	"UPDATE orch.steps s" \
	"   SET pending_needs = s.pending_needs - " n "," \
	"       needs_ok = s.needs_ok + " ok "," \
	"       status = CASE WHEN s.pending_needs = " n " THEN 'ready' ELSE s.status END," \
	"       wake_at = CASE WHEN s.pending_needs = " n " THEN pg_catalog.now() ELSE s.wake_at END" \
	from \
	" WHERE s.run_id = " run " AND s.name = " name " AND s.status = 'pending'" \
	" RETURNING CASE WHEN s.status = 'ready' THEN s.step_id END"

/*
 * n steps of a run moved: count down, start, finish ($3: the time); the run
 * found by its key alone (ORCH_RUN_STATUS_IN).
 */
#define RUNS_SQL(from, run, n) \
	"UPDATE orch.runs r" \
	"   SET steps_left = r.steps_left - " n "," \
	"       status = CASE WHEN r.steps_left - " n " = 0 THEN 'succeeded'" \
	"                     WHEN r.status = 'pending' THEN 'running' ELSE r.status END," \
	"       started_at = COALESCE(r.started_at, $3)," \
	"       finished_at = CASE WHEN r.steps_left - " n " = 0 THEN $3 END," \
	"       output = CASE WHEN r.steps_left - " n " = 0" \
	"                THEN " ORCH_STEP_OUTPUTS_SQL("r.run_id") " END" \
	from \
	" WHERE r.run_id = " run \
	"   AND NOT " ORCH_RUN_STATUS_IN("r", "'succeeded', 'failed', 'cancelled', 'timed_out'") \
	" RETURNING r.status = 'succeeded'"

static const char *const plan_sql[P_COUNT] = {
	/*
	 * Claiming due steps takes two statements.  The first picks candidates,
	 * the first $1 due steps (after ($2, $3) when resuming), without locks:
	 * an index-only scan of steps_due.  The second locks up to $2 of the
	 * candidates $1 by key, skipping those locked by others, and returns
	 * their current rows; the caller drops those no longer due.  A locking
	 * scan of the queue itself would take a row lock on every step that
	 * another batch changed since its snapshot (the recheck that skips such
	 * a row keeps its lock) and step over all of them, each time; and its
	 * plan would depend on the statistics of a table whose contents change
	 * completely within seconds.
	 */
	[P_CANDIDATES] =
	"SELECT pg_catalog.array_agg(d.step_id) FROM ("
	"  SELECT d.step_id FROM orch.steps d"
	"   WHERE d.status IN ('ready', 'waiting', 'retrying', 'running', 'blocked', 'needs_approval')"
	"     AND d.wake_at <= pg_catalog.now()"
	"   ORDER BY d.wake_at, d.step_id LIMIT $1) d",

	[P_CANDIDATES_AFTER] =
	"SELECT pg_catalog.array_agg(d.step_id) FROM ("
	"  SELECT d.step_id FROM orch.steps d"
	"   WHERE d.status IN ('ready', 'waiting', 'retrying', 'running', 'blocked', 'needs_approval')"
	"     AND d.wake_at <= pg_catalog.now()"
	"     AND (d.wake_at, d.step_id) > ($2, $3)"
	"   ORDER BY d.wake_at, d.step_id LIMIT $1) d",

	[P_CLAIM] =
	STEP_SELECT(STEPS_BY("$1", "step_id", "FOR UPDATE SKIP LOCKED"), "FOR UPDATE SKIP LOCKED")
	" LIMIT $2",

	/*
	 * The set-wise writes, each in two forms: from arrays, one element per
	 * row ($1 ...), and for a single row from plain parameters, which saves
	 * the arrays and the set-up of a function scan per column (a task's
	 * verdict writes one row of each).
	 */
	[P_FINISH] = FINISH_SQL(UNNEST_FROM("$1, $2, $3, $4, $5, $6",
										"id, status, output, error, attempt, finished_at"),
							"u.id", "u.status", "u.output", "u.error", "u.attempt", "u.finished_at"),
	[P_FINISH_1] = FINISH_SQL("", "$1", "$2", "$3", "$4", "$5", "$6"),

	[P_DEFER] = DEFER_SQL(UNNEST_FROM("$1, $2, $3, $4, $5, $6",
									  "id, status, wake_at, attempt, error, phase"),
						  "u.id", "u.status", "u.wake_at", "u.attempt", "u.error", "u.phase"),
	[P_DEFER_1] = DEFER_SQL("", "$1", "$2", "$3", "$4", "$5", "$6"),

	[P_ATTEMPT] = ATTEMPT_SQL(
		"SELECT u.step_id, u.attempt, u.run_id, u.worker, u.started_at, u.finished_at,"
		"       u.outcome::orch.attempt_outcome, u.error_class, u.sqlstate, u.message, u.detail,"
		"       u.hint, u.context, u.kind::orch.attempt_kind"
		UNNEST_FROM("$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14",
					"step_id, attempt, run_id, worker, started_at, finished_at, outcome,"
					" error_class, sqlstate, message, detail, hint, context, kind")),
	[P_ATTEMPT_1] = ATTEMPT_SQL(
		"VALUES ($1, $2, $3, $4, $5, $6, $7::orch.attempt_outcome, $8, $9, $10, $11, $12, $13,"
		"        $14::orch.attempt_kind)"),

	/* a need of (run, step) finished; ok is 1 if it succeeded */
	[P_PROPAGATE] = PROPAGATE_SQL(
		"  FROM (SELECT u.run_id, u.name, pg_catalog.count(*)::int AS n,"
		"               pg_catalog.sum(u.ok)::int AS ok"
		"          FROM unnest($1, $2, $3) AS u(run_id, name, ok)"
		"         GROUP BY 1, 2) d",
		"d.run_id", "d.name", "d.n", "d.ok"),
	[P_PROPAGATE_1] = PROPAGATE_SQL("", "$1", "$2", "1", "$3"),

	/* runs whose steps moved: count down, start, finish */
	[P_RUNS] = RUNS_SQL("  FROM (SELECT u.run_id, pg_catalog.sum(u.n)::int AS n"
						"          FROM unnest($1, $2) AS u(run_id, n) GROUP BY 1) d",
						"d.run_id", "d.n"),
	[P_RUNS_1] = RUNS_SQL("", "$1", "$2"),

	/* $1 run, $2 error, $3 time */
	[P_RUN_FAIL] =
	"UPDATE orch.runs SET status = 'failed', error = $2, finished_at = $3, steps_left = 0,"
	"       started_at = COALESCE(started_at, $3)"
	" WHERE run_id = $1",

	/*
	 * $1 run, $2 time: everything unfinished, leased tasks and blocked steps
	 * too.  A leased task keeps its token, so that its worker's late verdict
	 * is told the task was cancelled.
	 */
	[P_RUN_CANCEL_STEPS] =
	"UPDATE orch.steps SET status = 'cancelled', finished_at = $2, wake_at = NULL"
	" WHERE run_id = $1"
	"   AND status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled', 'compensated')",

	/* $1 run */
	[P_RUN_NEEDS_HUMAN] =
	"UPDATE orch.runs r SET status = 'needs_human'"
	" WHERE r.run_id = $1 AND " ORCH_RUN_STATUS_IN("r", "'pending', 'running', 'needs_approval'"),

	/* $1 circuit: take the probe of an open circuit whose cooldown passed */
	[P_CIRCUIT_PROBE] =
	"UPDATE orch.circuits SET state = 'half_open', changed_at = pg_catalog.now()"
	" WHERE name = $1 AND state = 'open' AND opened_at + cooldown <= pg_catalog.now()"
	" RETURNING 1",

	/* $1 circuit: a call went through; wake the steps that waited for it */
	[P_CIRCUIT_CLOSE] =
	"WITH c AS (UPDATE orch.circuits SET state = 'closed', failures = 0, opened_at = NULL,"
	"                  changed_at = pg_catalog.now()"
	"            WHERE name = $1 AND (state <> 'closed' OR failures > 0) RETURNING name)"
	"UPDATE orch.steps s SET wake_at = pg_catalog.now()"
	"  FROM c WHERE s.circuit = c.name AND s.status = 'blocked' AND s.wake_at > pg_catalog.now()",

	/* $1 circuit: a call failed; open at the threshold, or when the probe failed */
	[P_CIRCUIT_FAIL] =
	"UPDATE orch.circuits"
	"   SET failures = failures + 1,"
	"       state = CASE WHEN state = 'half_open' OR failures + 1 >= threshold THEN 'open'"
	"                    ELSE state END,"
	"       opened_at = CASE WHEN state = 'half_open' OR failures + 1 >= threshold"
	"                        THEN pg_catalog.now() ELSE opened_at END,"
	"       changed_at = pg_catalog.now()"
	" WHERE name = $1"
	" RETURNING state = 'open', opened_at + cooldown",

	/* runs past their deadline: timed out, their unfinished steps cancelled */
	[P_DEADLINES] =
	"WITH due AS ("
	"  SELECT run_id FROM orch.runs"
	"   WHERE deadline <= pg_catalog.now()"
	"     AND status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')"
	"   ORDER BY deadline LIMIT 100"
	"   FOR UPDATE SKIP LOCKED),"
	" cancelled AS ("
	"  UPDATE orch.steps st"
	"     SET status = 'cancelled', finished_at = pg_catalog.now(), wake_at = NULL,"
	"         lease_token = NULL"
	"    FROM due"
	"   WHERE st.run_id = due.run_id"
	"     AND st.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled', 'compensated')"
	"  RETURNING 1)"
	"UPDATE orch.runs r"
	"   SET status = 'timed_out', finished_at = pg_catalog.now(), steps_left = 0,"
	"       started_at = COALESCE(r.started_at, pg_catalog.now()),"
	"       error = pg_catalog.jsonb_build_object('message', 'the run passed its deadline',"
	"                                             'deadline', r.deadline,"
	"                                             'steps_cancelled', (SELECT pg_catalog.count(*) FROM cancelled))"
	"  FROM due WHERE r.run_id = due.run_id"
	" RETURNING r.run_id",

	[P_NEXT_TIMER] =
	"SELECT LEAST("
	"  (SELECT pg_catalog.min(wake_at) FROM orch.steps"
	"    WHERE status IN ('ready', 'waiting', 'retrying', 'running', 'blocked', 'needs_approval')),"
	"  (SELECT pg_catalog.min(deadline) FROM orch.runs"
	"    WHERE deadline IS NOT NULL"
	"      AND status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')))",

	/*
	 * $1 on_error rules, $2 class, $3 SQLSTATE: the step the first match goes
	 * to (NULL for a rule that goes to a human)
	 */
	[P_ROUTE] =
	"SELECT e.rule OPERATOR(pg_catalog.->>) 'goto'"
	"  FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS e(rule, i)"
	" WHERE pg_catalog.jsonb_typeof(e.rule OPERATOR(pg_catalog.->) 'errors') = 'null'"
	"    OR e.rule OPERATOR(pg_catalog.->) 'errors' OPERATOR(pg_catalog.?) $2"
	"    OR e.rule OPERATOR(pg_catalog.->) 'errors' OPERATOR(pg_catalog.?) $3"
	" ORDER BY e.i LIMIT 1",

	/* $1 run, $2 step, $3 the error that routes the run there */
	[P_SET_CAUSE] =
	"UPDATE orch.steps SET cause = $3 WHERE run_id = $1 AND name = $2",

	/* $1 step: the rare writes of verifications and compensations */
	[P_STEP_SET] =
	"UPDATE orch.steps"
	"   SET status = $2::orch.step_status, wake_at = $3, error = $4, phase = $5,"
	"       compensations = $6"
	" WHERE step_id = $1",

	/* $1 run: arm the compensation of its latest finished step that has one */
	[P_COMPENSATE_NEXT] =
	"SELECT orch._compensate_next($1)",

	/* $1 run, $2 event name, $3 step: take the first event of the name not yet taken */
	[P_TAKE_EVENT] =
	"UPDATE orch.events e SET consumed_by = $3, consumed_at = pg_catalog.now()"
	"  FROM (SELECT e0.event_id FROM orch.events e0"
	"         WHERE e0.run_id = $1 AND e0.name = $2 AND e0.consumed_by IS NULL"
	"         ORDER BY e0.run_id, e0.name, e0.event_id LIMIT 1) f"
	" WHERE e.event_id = f.event_id"
	" RETURNING e.payload",

	/* $1 step, $2 context, $3 whether it just became ready: see the function */
	[P_APPROVAL] =
	"SELECT orch._advance_approval($1, $2, $3)",

	/* $1 run */
	[P_RUN_NEEDS_APPROVAL] =
	"UPDATE orch.runs r SET status = 'needs_approval'"
	" WHERE r.run_id = $1 AND " ORCH_RUN_STATUS_IN("r", "'pending', 'running'"),

	/* $1 step, $2 context: start the step's child run */
	[P_START_CHILD] =
	"SELECT orch._start_child($1, $2)",

	/* $1 step: its latest child run */
	[P_CHILD] =
	"SELECT c.run_id, c.workflow, c.status, c.output, c.error OPERATOR(pg_catalog.->>) 'message',"
	"       c.created_at"
	"  FROM orch.runs c WHERE c.parent_step_id = $1"
	" ORDER BY c.parent_step_id, c.created_at DESC, c.run_id DESC LIMIT 1",

	/* $1 step, $2 context, $3 attempt: see the function */
	[P_MAP] =
	"SELECT orch._advance_map($1, $2, $3)",

	/* $1 run: cancel its unfinished child runs, before its own steps */
	[P_CANCEL_CHILDREN] =
	"SELECT orch._cancel_children($1)",

	/* $1 run, $2 its step that no longer waits for approval */
	[P_RUN_APPROVAL_DONE] =
	"SELECT orch._settle_run($1, $2)",
};

static const int plan_nargs[P_COUNT] = {
	[P_CANDIDATES] = 1,[P_CANDIDATES_AFTER] = 3,[P_CLAIM] = 2,[P_FINISH] = 7,[P_DEFER] = 7,[P_ATTEMPT] = 14,
	[P_PROPAGATE] = 3,[P_RUNS] = 3,
	[P_FINISH_1] = 7,[P_DEFER_1] = 7,[P_ATTEMPT_1] = 14,[P_PROPAGATE_1] = 3,[P_RUNS_1] = 3,[P_RUN_FAIL] = 3,
	[P_RUN_CANCEL_STEPS] = 2,[P_RUN_NEEDS_HUMAN] = 1,
	[P_CIRCUIT_PROBE] = 1,[P_CIRCUIT_CLOSE] = 1,[P_CIRCUIT_FAIL] = 1,[P_DEADLINES] = 0,
	[P_NEXT_TIMER] = 0,[P_ROUTE] = 3,[P_SET_CAUSE] = 3,[P_STEP_SET] = 6,[P_COMPENSATE_NEXT] = 1,
	[P_TAKE_EVENT] = 3,[P_APPROVAL] = 3,[P_RUN_NEEDS_APPROVAL] = 1,[P_RUN_APPROVAL_DONE] = 2,
	[P_START_CHILD] = 2,[P_CHILD] = 1,[P_CANCEL_CHILDREN] = 1,[P_MAP] = 3,
};

static const Oid plan_argtypes[P_COUNT][14] = {
	[P_CANDIDATES] = {INT4OID},
	[P_CANDIDATES_AFTER] = {INT4OID, TIMESTAMPTZOID, INT8OID},
	[P_CLAIM] = {INT8ARRAYOID, INT4OID},
	[P_FINISH] = {INT8ARRAYOID, TEXTARRAYOID, JSONBARRAYOID, JSONBARRAYOID, INT4ARRAYOID,
	TIMESTAMPTZARRAYOID, TIMESTAMPTZOID},
	[P_DEFER] = {INT8ARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID, INT4ARRAYOID, JSONBARRAYOID,
	TEXTARRAYOID, TIMESTAMPTZOID},
	[P_ATTEMPT] = {INT8ARRAYOID, INT4ARRAYOID, UUIDARRAYOID, TEXTARRAYOID, TIMESTAMPTZARRAYOID,
		TIMESTAMPTZARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
	TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID},
	[P_PROPAGATE] = {UUIDARRAYOID, TEXTARRAYOID, INT4ARRAYOID},
	[P_RUNS] = {UUIDARRAYOID, INT4ARRAYOID, TIMESTAMPTZOID},
	[P_FINISH_1] = {INT8OID, TEXTOID, JSONBOID, JSONBOID, INT4OID, TIMESTAMPTZOID, TIMESTAMPTZOID},
	[P_DEFER_1] = {INT8OID, TEXTOID, TIMESTAMPTZOID, INT4OID, JSONBOID, TEXTOID, TIMESTAMPTZOID},
	[P_ATTEMPT_1] = {INT8OID, INT4OID, UUIDOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID,
	TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID},
	[P_PROPAGATE_1] = {UUIDOID, TEXTOID, INT4OID},
	[P_RUNS_1] = {UUIDOID, INT4OID, TIMESTAMPTZOID},
	[P_RUN_FAIL] = {UUIDOID, JSONBOID, TIMESTAMPTZOID},
	[P_RUN_CANCEL_STEPS] = {UUIDOID, TIMESTAMPTZOID},
	[P_RUN_NEEDS_HUMAN] = {UUIDOID},
	[P_CIRCUIT_PROBE] = {TEXTOID},
	[P_CIRCUIT_CLOSE] = {TEXTOID},
	[P_CIRCUIT_FAIL] = {TEXTOID},
	[P_ROUTE] = {JSONBOID, TEXTOID, TEXTOID},
	[P_SET_CAUSE] = {UUIDOID, TEXTOID, JSONBOID},
	[P_STEP_SET] = {INT8OID, TEXTOID, TIMESTAMPTZOID, JSONBOID, TEXTOID, INT4OID},
	[P_COMPENSATE_NEXT] = {UUIDOID},
	[P_TAKE_EVENT] = {UUIDOID, TEXTOID, INT8OID},
	[P_APPROVAL] = {INT8OID, JSONBOID, BOOLOID},
	[P_RUN_NEEDS_APPROVAL] = {UUIDOID},
	[P_RUN_APPROVAL_DONE] = {UUIDOID, INT8OID},
	[P_START_CHILD] = {INT8OID, JSONBOID},
	[P_CHILD] = {INT8OID},
	[P_CANCEL_CHILDREN] = {UUIDOID},
	[P_MAP] = {INT8OID, JSONBOID, INT4OID},
};

/* ------------------------------------------------------------------------
 * Row buffers: one per set-wise statement, a column of Datums per array
 * parameter.  Their memory lives in rows_cxt, emptied after each flush.
 * ------------------------------------------------------------------------ */

#define MAX_COLS 14

typedef struct RowBuffer
{
	int			plan;			/* its statement, from arrays */
	int			plan_1;			/* the same for one row, from plain parameters */
	int			ncols;
	Oid			types[MAX_COLS];	/* element types */
	int			nrows;
	int			cap;
	Datum	   *values[MAX_COLS];
	bool	   *nulls[MAX_COLS];
	bool		have_typinfo;	/* the next three are filled in */
	int16		typlen[MAX_COLS];
	bool		typbyval[MAX_COLS];
	char		typalign[MAX_COLS];
} RowBuffer;

static RowBuffer finish_rows = {P_FINISH, P_FINISH_1, 6,
{INT8OID, TEXTOID, JSONBOID, JSONBOID, INT4OID, TIMESTAMPTZOID}};
static RowBuffer defer_rows = {P_DEFER, P_DEFER_1, 6,
{INT8OID, TEXTOID, TIMESTAMPTZOID, INT4OID, JSONBOID, TEXTOID}};
static RowBuffer attempt_rows = {P_ATTEMPT, P_ATTEMPT_1, 14,
	{INT8OID, INT4OID, UUIDOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID, TEXTOID,
TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID}};
static RowBuffer propagate_rows = {P_PROPAGATE, P_PROPAGATE_1, 3, {UUIDOID, TEXTOID, INT4OID}};
static RowBuffer run_rows = {P_RUNS, P_RUNS_1, 2, {UUIDOID, INT4OID}};

/* in the order they are written: a step's row before its dependents' and run's */
static RowBuffer *const all_buffers[] = {
	&finish_rows, &defer_rows, &attempt_rows, &propagate_rows, &run_rows
};

static MemoryContext rows_cxt = NULL;
/*
 * run_rows has a context of its own: the runs' counters are written once
 * per batch (a chain of steps advances through several claim rounds of a
 * batch, and its run would otherwise be updated in each), the other
 * buffers once per round.
 */
static MemoryContext run_rows_cxt = NULL;

static void
buffer_reset(RowBuffer *b)
{
	b->nrows = 0;
	b->cap = 0;
	memset(b->values, 0, sizeof(b->values));
	memset(b->nulls, 0, sizeof(b->nulls));
}

/* Empty the buffers; the runs' counters too if runs_too. */
static void
buffers_empty(bool runs_too)
{
	for (int i = 0; i < (int) lengthof(all_buffers); i++)
		if (all_buffers[i] != &run_rows)
			buffer_reset(all_buffers[i]);
	if (rows_cxt != NULL)
		MemoryContextReset(rows_cxt);
	if (runs_too)
	{
		buffer_reset(&run_rows);
		if (run_rows_cxt != NULL)
			MemoryContextReset(run_rows_cxt);
	}
}

/* Append a row; values are copied into the buffer's context. */
static void
buffer_add(RowBuffer *b, const Datum *values, const bool *nulls)
{
	MemoryContext oldcxt = MemoryContextSwitchTo(b == &run_rows ? run_rows_cxt : rows_cxt);

	if (b->nrows == b->cap)
	{
		int			newcap = Max(16, b->cap * 2);

		for (int c = 0; c < b->ncols; c++)
		{
			b->values[c] = b->cap == 0 ? palloc(sizeof(Datum) * newcap)
				: repalloc(b->values[c], sizeof(Datum) * newcap);
			b->nulls[c] = b->cap == 0 ? palloc(sizeof(bool) * newcap)
				: repalloc(b->nulls[c], sizeof(bool) * newcap);
		}
		b->cap = newcap;
	}
	if (!b->have_typinfo)
	{
		for (int c = 0; c < b->ncols; c++)
			get_typlenbyvalalign(b->types[c], &b->typlen[c], &b->typbyval[c], &b->typalign[c]);
		b->have_typinfo = true;
	}
	for (int c = 0; c < b->ncols; c++)
	{
		b->nulls[c][b->nrows] = nulls != NULL && nulls[c];
		if (b->nulls[c][b->nrows])
		{
			b->values[c][b->nrows] = (Datum) 0;
			continue;
		}
		b->values[c][b->nrows] = datumCopy(values[c], b->typbyval[c], b->typlen[c]);
	}
	b->nrows++;
	MemoryContextSwitchTo(oldcxt);
}

static int	exec_plan(int which, Datum *values, const char *nulls, int expected);

/* ------------------------------------------------------------------------
 * The rows of finish_rows, attempt_rows and run_rows written without the
 * executor (rowwrite.c), each as its statement (P_FINISH, P_ATTEMPT,
 * P_RUNS, and their single-row forms) writes it.  Each returns false,
 * having written nothing, where the table needs the statement.
 * ------------------------------------------------------------------------ */

/* The enum value label of the column att of rel (by attribute number). */
static Datum
enum_value_of(Relation rel, int16 att, const char *label)
{
	return ObjectIdGetDatum(orch_enum_oid(TupleDescAttr(RelationGetDescr(rel), att - 1)->atttypid,
										  label));
}

/* Is the enum value (of a status column) label? */
static bool
enum_is(Datum value, const char *label)
{
	return strcmp(DatumGetCString(DirectFunctionCall1(enum_out, value)), label) == 0;
}

/* A buffered row's column c, and whether it is NULL. */
#define BUF(b, c, r)		((b)->values[c][r])
#define BUF_NULL(b, c, r)	((b)->nulls[c][r])

enum
{
	FS_STEP_ID, FS_STATUS, FS_OUTPUT, FS_ERROR, FS_ATTEMPT, FS_STARTED_AT, FS_FINISHED_AT,
	FS_WAKE_AT, FS_LEASE_TOKEN, FS_PHASE, FS_NCOLS
};
static OrchRowSource finish_source = {
	"steps", "steps_pkey", 1, FS_NCOLS,
	{"step_id", "status", "output", "error", "attempt", "started_at", "finished_at",
	"wake_at", "lease_token", "phase"}
};

/*
 * FINISH_SQL for finish_rows (id, status, output, error, attempt,
 * finished_at), now being $7: steps cancelled meanwhile are left alone.
 */
static bool
finish_directly(RowBuffer *b, Datum now)
{
	const int16 *att = orch_row_source_attnums(&finish_source);
	OrchRowWriter w;
	Datum	   *v;
	bool	   *null;

	if (!orch_writer_begin(&w, finish_source.rels[0], CMD_UPDATE,
						   orch_writer_columns(att, FS_STATUS, FS_PHASE)))
		return false;
	v = w.values;
	null = w.nulls;
	for (int r = 0; r < b->nrows; r++)
	{
		int			started = att[FS_STARTED_AT] - 1;

		if (!orch_writer_lock(&w, &finish_source, &BUF(b, 0, r), NULL) ||
			enum_is(w.before->tts_values[att[FS_STATUS] - 1], "cancelled"))
			continue;
#define SET(c, value, isnull) (v[att[c] - 1] = (value), null[att[c] - 1] = (isnull))
		SET(FS_STATUS, enum_value_of(w.rel, att[FS_STATUS], TextDatumGetCString(BUF(b, 1, r))),
			false);
		SET(FS_OUTPUT, BUF(b, 2, r), BUF_NULL(b, 2, r));
		SET(FS_ERROR, BUF(b, 3, r), BUF_NULL(b, 3, r));
		SET(FS_ATTEMPT, BUF(b, 4, r), false);
		SET(FS_STARTED_AT, w.before->tts_isnull[started] ? now : w.before->tts_values[started],
			false);
		SET(FS_FINISHED_AT, BUF(b, 5, r), BUF_NULL(b, 5, r));
		SET(FS_WAKE_AT, (Datum) 0, true);
		SET(FS_LEASE_TOKEN, (Datum) 0, true);
		SET(FS_PHASE, (Datum) 0, true);
#undef SET
		orch_writer_update(&w);
	}
	orch_writer_end(&w);
	return true;
}

/* orch.attempts's columns, in the order of attempt_rows' columns */
enum
{
	AS_STEP_ID, AS_ATTEMPT, AS_RUN_ID, AS_WORKER, AS_STARTED_AT, AS_FINISHED_AT, AS_OUTCOME,
	AS_ERROR_CLASS, AS_SQLSTATE, AS_MESSAGE, AS_DETAIL, AS_HINT, AS_CONTEXT, AS_KIND, AS_NCOLS
};
static OrchRowSource attempt_source = {
	"attempts", "attempts_pkey", 3, AS_NCOLS,
	{"step_id", "attempt", "run_id", "worker", "started_at", "finished_at", "outcome",
	"error_class", "sqlstate", "message", "detail", "hint", "context", "kind"}
};

/* ATTEMPT_SQL for attempt_rows */
static bool
attempt_directly(RowBuffer *b)
{
	const int16 *att = orch_row_source_attnums(&attempt_source);
	OrchRowWriter w;
	TupleDesc	desc;
	Datum	   *v;
	bool	   *null;
	int			ncols = 0;

	if (!orch_writer_begin(&w, attempt_source.rels[0], CMD_INSERT, NULL))
		return false;
	desc = RelationGetDescr(w.rel);
	for (int a = 0; a < desc->natts; a++)
		if (!TupleDescAttr(desc, a)->attisdropped)
			ncols++;
	if (ncols != AS_NCOLS)
	{
		/* a column the statement leaves to its default */
		orch_writer_end(&w);
		return false;
	}
	v = w.values;
	null = w.nulls;
	for (int r = 0; r < b->nrows; r++)
	{
		for (int c = 0; c < AS_NCOLS; c++)
		{
			v[att[c] - 1] = BUF(b, c, r);
			null[att[c] - 1] = BUF_NULL(b, c, r);
		}
		v[att[AS_OUTCOME] - 1] = enum_value_of(w.rel, att[AS_OUTCOME],
											   TextDatumGetCString(BUF(b, AS_OUTCOME, r)));
		v[att[AS_KIND] - 1] = enum_value_of(w.rel, att[AS_KIND],
											TextDatumGetCString(BUF(b, AS_KIND, r)));
		orch_writer_insert(&w);
	}
	orch_writer_end(&w);
	return true;
}

enum
{
	RS_RUN_ID, RS_STATUS, RS_STEPS_LEFT, RS_STARTED_AT, RS_FINISHED_AT, RS_OUTPUT, RS_NCOLS
};
static OrchRowSource run_counter_source = {
	"runs", "runs_pkey", 1, RS_NCOLS,
	{"run_id", "status", "steps_left", "started_at", "finished_at", "output"}
};

/* a run's steps that moved in a batch */
typedef struct RunMoved
{
	Datum		run_id;
	int32		n;
} RunMoved;

static int
run_moved_cmp(const void *a, const void *b)
{
	return memcmp(DatumGetUUIDP(((const RunMoved *) a)->run_id),
				  DatumGetUUIDP(((const RunMoved *) b)->run_id), UUID_LEN);
}

/*
 * RUNS_SQL for run_rows (run, steps finished), now being $3: each run's
 * rows summed, the runs written in run_id order; the runs finished are
 * counted in result.
 */
static bool
run_counters_directly(RowBuffer *b, Datum now, OrchBatchResult *result)
{
	const int16 *att = orch_row_source_attnums(&run_counter_source);
	OrchRowWriter w;
	RunMoved   *runs;
	int			nruns = 0;
	Datum	   *v;
	bool	   *null;

	if (!orch_writer_begin(&w, run_counter_source.rels[0], CMD_UPDATE,
						   orch_writer_columns(att, RS_STATUS, RS_OUTPUT)))
		return false;
	runs = palloc(sizeof(RunMoved) * b->nrows);
	for (int r = 0; r < b->nrows; r++)
	{
		runs[r].run_id = BUF(b, 0, r);
		runs[r].n = DatumGetInt32(BUF(b, 1, r));
	}
	qsort(runs, b->nrows, sizeof(RunMoved), run_moved_cmp);
	for (int r = 0; r < b->nrows; r++)
	{
		if (nruns > 0 && run_moved_cmp(&runs[nruns - 1], &runs[r]) == 0)
			runs[nruns - 1].n += runs[r].n;
		else
			runs[nruns++] = runs[r];
	}

	v = w.values;
	null = w.nulls;
	for (int r = 0; r < nruns; r++)
	{
		Datum	   *old = w.before->tts_values;
		bool	   *old_null = w.before->tts_isnull;
		Datum		status;
		char	   *was;
		int32		left;
		int			started = att[RS_STARTED_AT] - 1;

		if (!orch_writer_lock(&w, &run_counter_source, &runs[r].run_id, NULL))
			continue;
		status = old[att[RS_STATUS] - 1];
		was = DatumGetCString(DirectFunctionCall1(enum_out, status));
		if (strcmp(was, "succeeded") == 0 || strcmp(was, "failed") == 0 ||
			strcmp(was, "cancelled") == 0 || strcmp(was, "timed_out") == 0)
			continue;
		left = DatumGetInt32(old[att[RS_STEPS_LEFT] - 1]) - runs[r].n;
#define SET(c, value, isnull) (v[att[c] - 1] = (value), null[att[c] - 1] = (isnull))
		SET(RS_STEPS_LEFT, Int32GetDatum(left), false);
		SET(RS_STATUS, left == 0 ? enum_value_of(w.rel, att[RS_STATUS], "succeeded") :
			strcmp(was, "pending") == 0 ? enum_value_of(w.rel, att[RS_STATUS], "running") :
			status, false);
		SET(RS_STARTED_AT, old_null[started] ? now : old[started], false);
		SET(RS_FINISHED_AT, now, left != 0);
		SET(RS_OUTPUT, left == 0 ? orch_run_outputs(runs[r].run_id) : (Datum) 0, left != 0);
#undef SET
		orch_writer_update(&w);
		if (left == 0)
			result->runs_finished++;
	}
	orch_writer_end(&w);
	return true;
}

enum
{
	PS_RUN_ID, PS_NAME, PS_STATUS, PS_PENDING_NEEDS, PS_NEEDS_OK, PS_WAKE_AT, PS_STEP_ID,
	PS_NCOLS
};
static OrchRowSource propagate_source = {
	"steps", "steps_run_id_name_key", 2, PS_NCOLS,
	{"run_id", "name", "status", "pending_needs", "needs_ok", "wake_at", "step_id"}
};

/* A step the batch made ready: its next round claims it (followers). */
static void
add_follower(Datum step_id)
{
	if (nfollowers == maxfollowers)
	{
		maxfollowers = Max(maxfollowers * 2, 64);
		followers = followers == NULL
			? MemoryContextAlloc(batch_cxt, sizeof(Datum) * maxfollowers)
			: repalloc(followers, sizeof(Datum) * maxfollowers);
	}
	followers[nfollowers++] = step_id;
	follow_total++;
}

/* needs of one step (run, name) that finished in a round: n, ok of them succeeded */
typedef struct NeedsDone
{
	Datum		run_id;
	text	   *name;
	int32		n;
	int32		ok;
} NeedsDone;

static int
needs_done_cmp(const void *a, const void *b)
{
	const NeedsDone *x = a;
	const NeedsDone *y = b;
	int			c = memcmp(DatumGetUUIDP(x->run_id), DatumGetUUIDP(y->run_id), UUID_LEN);
	int			lx = VARSIZE_ANY_EXHDR(x->name);
	int			ly = VARSIZE_ANY_EXHDR(y->name);

	if (c != 0)
		return c;
	c = memcmp(VARDATA_ANY(x->name), VARDATA_ANY(y->name), Min(lx, ly));
	return c != 0 ? c : (lx > ly) - (lx < ly);
}

/*
 * PROPAGATE_SQL for propagate_rows (run, step name, ok): each step's rows
 * summed (equal names are equal bytes: the key's collation is
 * deterministic), the steps written in (run_id, name) order, each only
 * while pending; result->made_ready when one was written, as the
 * statement reports any row updated, and those that became ready are the
 * batch's followers, as the statement returns them.
 */
static bool
propagate_directly(RowBuffer *b, OrchBatchResult *result)
{
	const int16 *att = orch_row_source_attnums(&propagate_source);
	OrchRowWriter w;
	NeedsDone  *needs;
	int			nneeds = 0;
	OrchRowMatch pending;
	Datum		ready;
	Datum		now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	Datum	   *v;
	bool	   *null;

	if (!orch_writer_begin(&w, propagate_source.rels[0], CMD_UPDATE,
						   orch_writer_columns(att, PS_STATUS, PS_WAKE_AT)))
		return false;
	needs = palloc(sizeof(NeedsDone) * b->nrows);
	for (int r = 0; r < b->nrows; r++)
	{
		needs[r].run_id = BUF(b, 0, r);
		needs[r].name = DatumGetTextPP(BUF(b, 1, r));
		needs[r].n = 1;
		needs[r].ok = DatumGetInt32(BUF(b, 2, r));
	}
	qsort(needs, b->nrows, sizeof(NeedsDone), needs_done_cmp);
	for (int r = 0; r < b->nrows; r++)
	{
		if (nneeds > 0 && needs_done_cmp(&needs[nneeds - 1], &needs[r]) == 0)
		{
			needs[nneeds - 1].n += needs[r].n;
			needs[nneeds - 1].ok += needs[r].ok;
		}
		else
			needs[nneeds++] = needs[r];
	}

	pending.col = PS_STATUS;
	pending.value = enum_value_of(w.rel, att[PS_STATUS], "pending");
	ready = enum_value_of(w.rel, att[PS_STATUS], "ready");
	v = w.values;
	null = w.nulls;
	for (int r = 0; r < nneeds; r++)
	{
		Datum		keys[2] = {needs[r].run_id, PointerGetDatum(needs[r].name)};
		Datum	   *old = w.before->tts_values;
		int32		left;

		if (!orch_writer_lock(&w, &propagate_source, keys, &pending))
			continue;
		left = DatumGetInt32(old[att[PS_PENDING_NEEDS] - 1]) - needs[r].n;
#define SET(c, value, isnull) (v[att[c] - 1] = (value), null[att[c] - 1] = (isnull))
		SET(PS_PENDING_NEEDS, Int32GetDatum(left), false);
		SET(PS_NEEDS_OK, Int32GetDatum(DatumGetInt32(old[att[PS_NEEDS_OK] - 1]) + needs[r].ok),
			false);
		SET(PS_STATUS, left == 0 ? ready : old[att[PS_STATUS] - 1], false);
		SET(PS_WAKE_AT, left == 0 ? now : old[att[PS_WAKE_AT] - 1],
			left == 0 ? false : w.before->tts_isnull[att[PS_WAKE_AT] - 1]);
#undef SET
		orch_writer_update(&w);
		result->made_ready = true;
		if (left == 0)
			add_follower(old[att[PS_STEP_ID] - 1]);
	}
	orch_writer_end(&w);
	return true;
}

/* Write a buffer's rows with its statement; extra is its trailing parameter. */
static void
buffer_flush(RowBuffer *b, Datum extra, OrchBatchResult *result)
{
	Datum		params[MAX_COLS + 1];
	char		nulls[MAX_COLS + 2];
	int			plan;

	if (b->nrows == 0)
		return;
	Assert(b->have_typinfo);

	/* without the executor where it can be */
	if ((b->plan == P_FINISH && finish_directly(b, extra)) ||
		(b->plan == P_ATTEMPT && attempt_directly(b)) ||
		(b->plan == P_PROPAGATE && propagate_directly(b, result)) ||
		(b->plan == P_RUNS && run_counters_directly(b, extra, result)))
	{
		b->nrows = 0;
		return;
	}
	memset(nulls, ' ', b->ncols + 1);
	nulls[b->ncols + 1] = '\0';
	if (b->nrows == 1)
	{
		plan = b->plan_1;
		for (int c = 0; c < b->ncols; c++)
		{
			params[c] = b->values[c][0];
			if (b->nulls[c][0])
				nulls[c] = 'n';
		}
	}
	else
	{
		int			dims[1] = {b->nrows};
		int			lbs[1] = {1};

		plan = b->plan;
		for (int c = 0; c < b->ncols; c++)
			params[c] = PointerGetDatum(construct_md_array(b->values[c], b->nulls[c], 1, dims, lbs,
														   b->types[c], b->typlen[c],
														   b->typbyval[c], b->typalign[c]));
	}
	params[b->ncols] = extra;

	switch (b->plan)
	{
		case P_PROPAGATE:
			exec_plan(plan, params, nulls, SPI_OK_UPDATE_RETURNING);
			if (SPI_processed > 0)
				result->made_ready = true;
			for (uint64 i = 0; i < SPI_processed; i++)
			{
				bool		isnull;
				Datum		id = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
											   1, &isnull);

				if (!isnull)
					add_follower(id);
			}
			SPI_freetuptable(SPI_tuptable);
			break;
		case P_RUNS:
			exec_plan(plan, params, nulls, SPI_OK_UPDATE_RETURNING);
			for (uint64 i = 0; i < SPI_processed; i++)
			{
				bool		isnull;

				if (DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
											   1, &isnull)))
					result->runs_finished++;
			}
			SPI_freetuptable(SPI_tuptable);
			break;
		case P_ATTEMPT:
			exec_plan(plan, params, nulls, SPI_OK_INSERT);
			break;
		default:
			exec_plan(plan, params, nulls, SPI_OK_UPDATE);
			break;
	}
	b->nrows = 0;
}

/*
 * Write what is buffered, in dependency order.  runs_too false: all but the
 * runs' counters, which wait for the end of the batch (or for flush_all,
 * which a run failing calls before it sets its counter to zero).  Nothing a
 * later claim round reads depends on them: a run's status goes from pending
 * to running, both active, and it finishes only when its last step has.
 */
static void
flush_buffers(TimestampTz now, OrchBatchResult *result, bool runs_too)
{
	Datum		ts = TimestampTzGetDatum(now);

	buffer_flush(&finish_rows, ts, result);
	buffer_flush(&defer_rows, ts, result);
	buffer_flush(&attempt_rows, (Datum) 0, result);
	buffer_flush(&propagate_rows, (Datum) 0, result);
	if (runs_too)
		buffer_flush(&run_rows, ts, result);
	buffers_empty(runs_too);
}

/* Write everything buffered. */
static void
flush_all(TimestampTz now, OrchBatchResult *result)
{
	flush_buffers(now, result, true);
}

static SPIPlanPtr
get_plan(int which)
{
	if (plans[which] == NULL)
	{
		/*
		 * Generic plans: every statement reaches its rows through an index,
		 * and planning each execution would cost more than running it.
		 */
		SPIPlanPtr	plan = SPI_prepare_cursor(plan_sql[which], plan_nargs[which],
											  (Oid *) plan_argtypes[which],
											  CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "could not prepare orchestrator statement %d: %s",
				 which, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "could not keep orchestrator statement %d", which);
		plans[which] = plan;
	}
	return plans[which];
}

/*
 * Planner settings for the engine's own statements.  They reach a handful of
 * rows by key or in wake_at order, and must keep doing so when the planner
 * knows nothing of the tables (a new installation, before ANALYZE): with
 * default settings a plan made then sorts every due step for each claim.
 * Applied only while the engine's own statements are planned (orch_planner),
 * so step functions plan as usual.
 */
static const char *const engine_planner_settings[][2] = {
	{"enable_seqscan", "off"}, {"enable_bitmapscan", "off"}, {"enable_hashjoin", "off"},
	{"enable_mergejoin", "off"}, {"enable_sort", "off"},
	/* every inner side is a lookup by key: a cache in front of it only costs its set-up */
	{"enable_memoize", "off"},
	/* explicit JOINs in the order written: the first relation drives */
	{"join_collapse_limit", "1"},

	/*
	 * (The statements are written to plan alike whatever their parameters
	 * and the statistics, and are prepared as generic plans: each is planned
	 * once per session, not at each of its first executions, as a claim's
	 * plan costs milliseconds to make.)
	 */

	/*
	 * A plan that needs a disabled node (a sort) costs 1e10 and more, far
	 * above jit_above_cost: JIT compilation would cost a tenth of a second
	 * at every execution of a statement that runs in well under a
	 * millisecond.
	 */
	{"jit", "off"}
};

/*
 * How many of the engine's own statement runs are in progress (they nest:
 * a statement's trigger may run another).  While there is one, the planner
 * applies the settings above (orch_planner): statements are planned once
 * per session (generic plans), so applying the settings around every
 * statement, as a function's SET clause does, cost more than the
 * statements' own planning (about 15,000 instructions a time, twice per
 * task of a worker).
 */
static int	engine_statements = 0;
static planner_hook_type prev_planner_hook = NULL;

static PlannedStmt *
orch_planner(Query *parse, const char *query_string, int cursor_options,
			 ParamListInfo bound_params)
{
	PlannedStmt *result;
	int			nest_level = 0;

	if (engine_statements > 0)
	{
		nest_level = NewGUCNestLevel();
		for (int i = 0; i < (int) lengthof(engine_planner_settings); i++)
			(void) set_config_option(engine_planner_settings[i][0], engine_planner_settings[i][1],
									 PGC_USERSET, PGC_S_SESSION,
									 GUC_ACTION_SAVE, true, 0, false);
	}
	/* an error restores the settings itself */
	result = prev_planner_hook != NULL ?
		prev_planner_hook(parse, query_string, cursor_options, bound_params) :
		standard_planner(parse, query_string, cursor_options, bound_params);
	if (nest_level > 0)
		AtEOXact_GUC(true, nest_level);
	return result;
}

void
orch_planner_install(void)
{
	prev_planner_hook = planner_hook;
	planner_hook = orch_planner;
}

/*
 * Run one of the engine's saved statements (SPI_execute_plan), planned, if
 * it must be, with the engine's settings.
 */
int
orch_execute_plan(SPIPlanPtr plan, Datum *values, const char *nulls, long count)
{
	volatile int rc = 0;

	engine_statements++;
	PG_TRY();
	{
		rc = SPI_execute_plan(plan, values, nulls, false, count);
	}
	PG_FINALLY();
	{
		engine_statements--;
	}
	PG_END_TRY();
	return rc;
}

/*
 * fn(arg) in a subtransaction rolled back at once: what it leaves in the
 * session (plans, catalog and relation caches) stays, the locks it took
 * go.  For a caller about to sleep, which must not hold them.
 */
void
orch_rolled_back(void (*fn) (void *arg), void *arg)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;

	BeginInternalSubTransaction(NULL);
	fn(arg);
	RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
}

/* Make the generic plan of a saved statement, with the engine's settings. */
static void
make_plan(void *arg)
{
	SPIPlanPtr	plan = arg;

	engine_statements++;
	PG_TRY();
	{
		CachedPlan *cplan = SPI_plan_get_cached_plan(plan);

		if (cplan != NULL)
			ReleaseCachedPlan(cplan, CurrentResourceOwner);
	}
	PG_FINALLY();
	{
		engine_statements--;
	}
	PG_END_TRY();
}

/*
 * Make the generic plan of one of the engine's saved statements now, with
 * the engine's settings, if it has none yet (its first use in the session,
 * or after an invalidation), without running it; false if it had one.  In
 * a subtransaction rolled back at once: the plan stays with the session,
 * but not the locks that making and checking it took (the statement's
 * tables in the modes it runs with), which the caller, about to sleep,
 * must not hold.
 */
bool
orch_plan_ahead(SPIPlanPtr plan)
{
	CachedPlanSource *source = linitial(plan->plancache_list);

	if (source->is_valid && source->gplan != NULL && source->gplan->is_valid)
		return false;
	orch_rolled_back(make_plan, plan);
	return true;
}

/* Run a saved statement; nulls are given as a string of ' ' and 'n'. */
static int
exec_plan(int which, Datum *values, const char *nulls, int expected)
{
	int			rc = orch_execute_plan(get_plan(which), values, nulls, 0);

	if (rc != expected)
		elog(ERROR, "orchestrator statement %d failed: %s", which, SPI_result_code_string(rc));
	return rc;
}

/* ------------------------------------------------------------------------
 * Claiming
 * ------------------------------------------------------------------------ */

static char *
get_text(HeapTuple tup, TupleDesc desc, int col)
{
	return SPI_getvalue(tup, desc, col);	/* palloc'd in the current context */
}

static Datum
get_copy(HeapTuple tup, TupleDesc desc, int col, bool *isnull)
{
	Datum		d = SPI_getbinval(tup, desc, col, isnull);
	Form_pg_attribute att = TupleDescAttr(desc, col - 1);

	if (*isnull)
		return (Datum) 0;
	return datumCopy(d, att->attbyval, att->attlen);
}

/*
 * A column of a row deformed into values and nulls (col counts from 1),
 * as SPI_getbinval, SPI_getvalue and get_copy give it from the tuple.  A
 * row of a STEP_SELECT is deformed once: reading its 52 columns one by one
 * walks the tuple from its start for each column after a NULL.
 */
static inline Datum
col_value(const Datum *v, const bool *nulls, int col, bool *isnull)
{
	*isnull = nulls[col - 1];
	return *isnull ? (Datum) 0 : v[col - 1];
}

static Datum
col_copy(const Datum *v, const bool *nulls, TupleDesc desc, int col, bool *isnull)
{
	Form_pg_attribute att = TupleDescAttr(desc, col - 1);

	*isnull = nulls[col - 1];
	if (*isnull)
		return (Datum) 0;
	return datumCopy(v[col - 1], att->attbyval, att->attlen);
}

/* a text column (STEP_COLUMNS casts the others it gives as text) */
static char *
col_text(const Datum *v, const bool *nulls, TupleDesc desc, int col)
{
	Assert(TupleDescAttr(desc, col - 1)->atttypid == TEXTOID);
	return nulls[col - 1] ? NULL : TextDatumGetCString(v[col - 1]);
}

/* Run a STEP_SELECT statement and copy its rows out of SPI memory into cxt. */
static int
fetch_steps(int plan, Datum *args, MemoryContext cxt, ClaimedStep **steps_out)
{
	ClaimedStep *steps;
	uint64		n;
	MemoryContext oldcxt;
	TupleDesc	desc;
	Datum		v[STEP_NCOLS];
	bool		nulls[STEP_NCOLS];

	exec_plan(plan, args, NULL, SPI_OK_SELECT);
	n = SPI_processed;

	desc = SPI_tuptable->tupdesc;
	Assert(desc->natts == STEP_NCOLS);
	oldcxt = MemoryContextSwitchTo(cxt);
	steps = palloc0(sizeof(ClaimedStep) * Max(n, 1));
	for (uint64 i = 0; i < n; i++)
	{
		ClaimedStep *s = &steps[i];
		bool		isnull;
		Datum		d;

		heap_deform_tuple(SPI_tuptable->vals[i], desc, v, nulls);

		s->step_id = DatumGetInt64(v[1 - 1]);
		s->run_id = col_copy(v, nulls, desc, 2, &isnull);
		s->name = col_text(v, nulls, desc, 3);
		s->status = col_text(v, nulls, desc, 4);
		s->attempt = DatumGetInt32(col_value(v, nulls, 5, &isnull));
		s->needs_ok = DatumGetInt32(col_value(v, nulls, 6, &isnull));
		s->n_needs = DatumGetInt32(col_value(v, nulls, 7, &isnull));
		s->kind = col_text(v, nulls, desc, 8);
		d = col_value(v, nulls, 9, &isnull);
		s->function = isnull ? InvalidOid : DatumGetObjectId(d);
		s->function_name = col_text(v, nulls, desc, 10);
		s->guard = col_copy(v, nulls, desc, 11, &isnull);
		d = col_copy(v, nulls, desc, 12, &isnull);
		s->sleep_for = isnull ? NULL : DatumGetIntervalP(d);
		s->sleep_until = col_copy(v, nulls, desc, 13, &isnull);
		s->max_attempts = DatumGetInt32(col_value(v, nulls, 14, &isnull));
		s->initial_interval = DatumGetIntervalP(col_copy(v, nulls, desc, 15, &isnull));
		s->backoff_coefficient = DatumGetFloat8(col_value(v, nulls, 16, &isnull));
		s->max_interval = DatumGetIntervalP(col_copy(v, nulls, desc, 17, &isnull));
		s->jitter = DatumGetBool(col_value(v, nulls, 18, &isnull));
		d = col_copy(v, nulls, desc, 19, &isnull);
		s->timeout = isnull ? NULL : DatumGetIntervalP(d);
		s->non_retryable = col_copy(v, nulls, desc, 20, &isnull);
		s->dependents = col_copy(v, nulls, desc, 21, &isnull);
		s->run_status = col_text(v, nulls, desc, 22);
		s->owner = col_text(v, nulls, desc, 23);
		s->ctx = col_copy(v, nulls, desc, 24, &isnull);
		s->wake_at = DatumGetTimestampTz(col_value(v, nulls, 25, &isnull));
		d = col_copy(v, nulls, desc, 26, &isnull);
		s->schedule_to_close = isnull ? NULL : DatumGetIntervalP(d);
		s->attempt_base = DatumGetInt32(col_value(v, nulls, 27, &isnull));
		d = col_value(v, nulls, 28, &isnull);
		s->started_at = isnull ? 0 : DatumGetTimestampTz(d);
		d = col_value(v, nulls, 29, &isnull);
		s->attempt_started_at = isnull ? 0 : DatumGetTimestampTz(d);
		s->worker = col_text(v, nulls, desc, 30);
		s->circuit = col_text(v, nulls, desc, 31);
		s->circuit_state = col_text(v, nulls, desc, 32);
		d = col_value(v, nulls, 33, &isnull);
		s->circuit_failures = isnull ? 0 : DatumGetInt32(d);
		d = col_value(v, nulls, 34, &isnull);
		s->circuit_probe_after = isnull ? 0 : DatumGetTimestampTz(d);
		d = col_copy(v, nulls, desc, 35, &isnull);
		s->schedule_to_start = isnull ? NULL : DatumGetIntervalP(d);
		s->phase = col_text(v, nulls, desc, 36);
		s->idempotent = DatumGetBool(col_value(v, nulls, 37, &isnull));
		d = col_value(v, nulls, 38, &isnull);
		s->verify = isnull ? InvalidOid : DatumGetObjectId(d);
		s->verify_name = col_text(v, nulls, desc, 39);
		d = col_value(v, nulls, 40, &isnull);
		s->compensate = isnull ? InvalidOid : DatumGetObjectId(d);
		s->compensate_name = col_text(v, nulls, desc, 41);
		s->on_error = col_copy(v, nulls, desc, 42, &isnull);
		s->routes = col_copy(v, nulls, desc, 43, &isnull);
		s->route_target = DatumGetBool(col_value(v, nulls, 44, &isnull));
		s->compensations = DatumGetInt32(col_value(v, nulls, 45, &isnull));
		s->lease_token = col_copy(v, nulls, desc, 46, &isnull);
		s->resolution = col_copy(v, nulls, desc, 47, &isnull);
		s->event = col_text(v, nulls, desc, 48);
		s->on_timeout = col_text(v, nulls, desc, 49);
		s->input_schema = col_copy(v, nulls, desc, 50, &isnull);
		s->output_schema = col_copy(v, nulls, desc, 51, &isnull);
		s->review_if = col_copy(v, nulls, desc, 52, &isnull);
	}
	MemoryContextSwitchTo(oldcxt);
	SPI_freetuptable(SPI_tuptable);

	*steps_out = steps;
	return (int) n;
}

/*
 * A task by its lease token, for its worker's verdict: the columns of
 * STEP_COLUMNS but the context (a verdict needs none), read row by row
 * (rowfetch.c).  As one statement of lateral lookups the same rows cost
 * several times as much, most of it to set up the statement's plan.  The
 * step and then its run are locked FOR UPDATE, in that order; then the
 * step's definition and its circuit are read, each (in READ COMMITTED)
 * with a snapshot of its own, taken after those locks: the circuit's state
 * as of then.  The step is the one the token names (uuid_v7.c), and only
 * if it holds the token's lease, checked before it is locked (a stale or
 * made-up token locks nothing) and again in the version locked.  Returns
 * false when no step holds the lease.
 */
enum
{
	TS_STEP_ID, TS_RUN_ID, TS_NAME, TS_STATUS, TS_ATTEMPT, TS_NEEDS_OK, TS_WAKE_AT,
	TS_ATTEMPT_BASE, TS_STARTED_AT, TS_ATTEMPT_STARTED_AT, TS_WORKER, TS_PHASE,
	TS_COMPENSATIONS, TS_LEASE_TOKEN, TS_RESOLUTION, TS_NCOLS
};
static OrchRowSource task_step_source = {
	"steps", "steps_pkey", 1, TS_NCOLS,
	{"step_id", "run_id", "name", "status", "attempt", "needs_ok", "wake_at",
	"attempt_base", "started_at", "attempt_started_at", "worker", "phase",
	"compensations", "lease_token", "resolution"}
};

enum
{
	TR_WORKFLOW, TR_VERSION, TR_STATUS, TR_OWNER, TR_NCOLS
};
static OrchRowSource task_run_source = {
	"runs", "runs_pkey", 1, TR_NCOLS,
	{"workflow", "version", "status", "owner"}
};

enum
{
	TW_NEEDS, TW_KIND, TW_FUNCTION, TW_FUNCTION_NAME, TW_GUARD, TW_SLEEP_FOR,
	TW_SLEEP_UNTIL, TW_MAX_ATTEMPTS, TW_INITIAL_INTERVAL, TW_BACKOFF_COEFFICIENT,
	TW_MAX_INTERVAL, TW_JITTER, TW_TIMEOUT, TW_NON_RETRYABLE, TW_DEPENDENTS,
	TW_SCHEDULE_TO_CLOSE, TW_CIRCUIT, TW_SCHEDULE_TO_START, TW_IDEMPOTENT, TW_VERIFY,
	TW_VERIFY_NAME, TW_COMPENSATE, TW_COMPENSATE_NAME, TW_ON_ERROR, TW_ROUTES,
	TW_ROUTE_TARGET, TW_EVENT, TW_ON_TIMEOUT, TW_INPUT_SCHEMA, TW_OUTPUT_SCHEMA,
	TW_REVIEW_IF, TW_NCOLS
};
static OrchRowSource task_definition_source = {
	"workflow_steps", "workflow_steps_pkey", 3, TW_NCOLS,
	{"needs", "kind", "function", "function_name", "guard", "sleep_for",
	"sleep_until", "max_attempts", "initial_interval", "backoff_coefficient",
	"max_interval", "jitter", "timeout", "non_retryable", "dependents",
	"schedule_to_close", "circuit", "schedule_to_start", "idempotent", "verify",
	"verify_name", "compensate", "compensate_name", "on_error", "routes",
	"route_target", "event", "on_timeout", "input_schema", "output_schema",
	"review_if"}
};

enum
{
	TC_STATE, TC_FAILURES, TC_OPENED_AT, TC_COOLDOWN, TC_NCOLS
};
static OrchRowSource task_circuit_source = {
	"circuits", "circuits_pkey", 1, TC_NCOLS,
	{"state", "failures", "opened_at", "cooldown"}
};

/* The step a lease token names, as a key of orch.steps_pkey; false: none. */
static bool
lease_step(Datum token, Datum *key)
{
	int64		step_id;

	if (!orch_lease_token_step(token, &step_id))
		return false;
	*key = Int64GetDatum(step_id);
	return true;
}

#define TEXT_OR_NULL(v, nulls, i) ((nulls)[i] ? NULL : TextDatumGetCString((v)[i]))
#define DATUM_OR_0(v, nulls, i) ((nulls)[i] ? (Datum) 0 : (v)[i])

static bool
fetch_task_by_token(Datum token, MemoryContext cxt, ClaimedStep *s)
{
	Datum		sv[TS_NCOLS],
				rv[TR_NCOLS],
				wv[TW_NCOLS],
				cv[TC_NCOLS];
	bool		sn[TS_NCOLS],
				rn[TR_NCOLS],
				wn[TW_NCOLS],
				cn[TC_NCOLS];
	Datum		wkey[3];
	Datum		step_key;
	OrchRowMatch lease = {TS_LEASE_TOKEN, token};	/* locked only if it holds the lease */
	MemoryContext oldcxt = MemoryContextSwitchTo(cxt);
	bool		found;

	memset(s, 0, sizeof(*s));
	found = lease_step(token, &step_key) &&
		orch_row_fetch_match(&task_step_source, &step_key, &lease, true, sv, sn) &&
		orch_row_fetch(&task_run_source, &sv[TS_RUN_ID], true, rv, rn);
	if (found)
	{
		wkey[0] = rv[TR_WORKFLOW];
		wkey[1] = rv[TR_VERSION];
		wkey[2] = sv[TS_NAME];
		if (!orch_row_fetch(&task_definition_source, wkey, false, wv, wn))
			elog(ERROR, "step \"%s\" of run %s has no definition",
				 TextDatumGetCString(sv[TS_NAME]),
				 DatumGetCString(DirectFunctionCall1(uuid_out, sv[TS_RUN_ID])));
		if (wn[TW_CIRCUIT] ||
			!orch_row_fetch(&task_circuit_source, &wv[TW_CIRCUIT], false, cv, cn))
		{
			for (int i = 0; i < TC_NCOLS; i++)
				cn[i] = true;
		}

		s->step_id = DatumGetInt64(sv[TS_STEP_ID]);
		s->run_id = sv[TS_RUN_ID];
		s->name = TextDatumGetCString(sv[TS_NAME]);
		s->status = DatumGetCString(DirectFunctionCall1(enum_out, sv[TS_STATUS]));
		s->attempt = DatumGetInt32(sv[TS_ATTEMPT]);
		s->needs_ok = DatumGetInt32(sv[TS_NEEDS_OK]);
		s->wake_at = sn[TS_WAKE_AT] ? 0 : DatumGetTimestampTz(sv[TS_WAKE_AT]);
		s->attempt_base = DatumGetInt32(sv[TS_ATTEMPT_BASE]);
		s->started_at = sn[TS_STARTED_AT] ? 0 : DatumGetTimestampTz(sv[TS_STARTED_AT]);
		s->attempt_started_at = sn[TS_ATTEMPT_STARTED_AT] ? 0 :
			DatumGetTimestampTz(sv[TS_ATTEMPT_STARTED_AT]);
		s->worker = TEXT_OR_NULL(sv, sn, TS_WORKER);
		s->phase = TEXT_OR_NULL(sv, sn, TS_PHASE);
		s->compensations = DatumGetInt32(sv[TS_COMPENSATIONS]);
		s->lease_token = DATUM_OR_0(sv, sn, TS_LEASE_TOKEN);
		s->resolution = DATUM_OR_0(sv, sn, TS_RESOLUTION);

		s->run_status = DatumGetCString(DirectFunctionCall1(enum_out, rv[TR_STATUS]));
		s->owner = pstrdup(NameStr(*DatumGetName(rv[TR_OWNER])));
		s->ctx = (Datum) 0;

		{
			ArrayType  *needs = DatumGetArrayTypeP(wv[TW_NEEDS]);

			s->n_needs = ArrayGetNItems(ARR_NDIM(needs), ARR_DIMS(needs));
		}
		s->kind = TextDatumGetCString(wv[TW_KIND]);
		s->function = wn[TW_FUNCTION] ? InvalidOid : DatumGetObjectId(wv[TW_FUNCTION]);
		s->function_name = TEXT_OR_NULL(wv, wn, TW_FUNCTION_NAME);
		s->guard = DATUM_OR_0(wv, wn, TW_GUARD);
		s->sleep_for = wn[TW_SLEEP_FOR] ? NULL : DatumGetIntervalP(wv[TW_SLEEP_FOR]);
		s->sleep_until = DATUM_OR_0(wv, wn, TW_SLEEP_UNTIL);
		s->max_attempts = DatumGetInt32(wv[TW_MAX_ATTEMPTS]);
		s->initial_interval = DatumGetIntervalP(wv[TW_INITIAL_INTERVAL]);
		s->backoff_coefficient = DatumGetFloat8(wv[TW_BACKOFF_COEFFICIENT]);
		s->max_interval = DatumGetIntervalP(wv[TW_MAX_INTERVAL]);
		s->jitter = DatumGetBool(wv[TW_JITTER]);
		s->timeout = wn[TW_TIMEOUT] ? NULL : DatumGetIntervalP(wv[TW_TIMEOUT]);
		s->non_retryable = DATUM_OR_0(wv, wn, TW_NON_RETRYABLE);
		s->dependents = wv[TW_DEPENDENTS];
		s->schedule_to_close = wn[TW_SCHEDULE_TO_CLOSE] ? NULL :
			DatumGetIntervalP(wv[TW_SCHEDULE_TO_CLOSE]);
		s->circuit = TEXT_OR_NULL(wv, wn, TW_CIRCUIT);
		s->schedule_to_start = wn[TW_SCHEDULE_TO_START] ? NULL :
			DatumGetIntervalP(wv[TW_SCHEDULE_TO_START]);
		s->idempotent = DatumGetBool(wv[TW_IDEMPOTENT]);
		s->verify = wn[TW_VERIFY] ? InvalidOid : DatumGetObjectId(wv[TW_VERIFY]);
		s->verify_name = TEXT_OR_NULL(wv, wn, TW_VERIFY_NAME);
		s->compensate = wn[TW_COMPENSATE] ? InvalidOid : DatumGetObjectId(wv[TW_COMPENSATE]);
		s->compensate_name = TEXT_OR_NULL(wv, wn, TW_COMPENSATE_NAME);
		s->on_error = DATUM_OR_0(wv, wn, TW_ON_ERROR);
		s->routes = DATUM_OR_0(wv, wn, TW_ROUTES);
		s->route_target = DatumGetBool(wv[TW_ROUTE_TARGET]);
		s->event = TEXT_OR_NULL(wv, wn, TW_EVENT);
		s->on_timeout = TEXT_OR_NULL(wv, wn, TW_ON_TIMEOUT);
		s->input_schema = DATUM_OR_0(wv, wn, TW_INPUT_SCHEMA);
		s->output_schema = DATUM_OR_0(wv, wn, TW_OUTPUT_SCHEMA);
		s->review_if = DATUM_OR_0(wv, wn, TW_REVIEW_IF);

		s->circuit_state = TEXT_OR_NULL(cv, cn, TC_STATE);
		s->circuit_failures = cn[TC_FAILURES] ? 0 : DatumGetInt32(cv[TC_FAILURES]);
		s->circuit_probe_after = cn[TC_OPENED_AT] ? 0 :
			DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
													cv[TC_OPENED_AT], cv[TC_COOLDOWN]));
	}
	MemoryContextSwitchTo(oldcxt);
	return found;
}

/* a task's run and lease, by the step, and a run to lock by its id */
static OrchRowSource token_run_source = {
	"steps", "steps_pkey", 1, 2, {"run_id", "lease_token"}
};
static OrchRowSource run_lock_source = {
	"runs", "runs_pkey", 1, 0, {NULL}
};

static int
uuid_datum_cmp(const void *a, const void *b)
{
	return memcmp(DatumGetUUIDP(*(const Datum *) a), DatumGetUUIDP(*(const Datum *) b), UUID_LEN);
}

/*
 * Tasks by their lease tokens (distinct, sorted by the caller), for a batch
 * of verdicts: the runs of those tasks are locked first, in run_id order,
 * then each task as fetch_task_by_token finds it, in token order, so that
 * two calls whose tasks belong to the same runs cannot deadlock.  Returns
 * how many were found, in *steps_out (allocated in cxt), in token order.
 */
static int
fetch_tasks_by_tokens(const Datum *tokens, int n, MemoryContext cxt, ClaimedStep **steps_out)
{
	MemoryContext oldcxt = MemoryContextSwitchTo(cxt);
	Datum	   *runs = palloc(sizeof(Datum) * Max(n, 1));
	ClaimedStep *steps = palloc0(sizeof(ClaimedStep) * Max(n, 1));
	int			nruns = 0;
	int			nfound = 0;

	for (int i = 0; i < n; i++)
	{
		Datum		key;
		OrchRowMatch lease = {1, tokens[i]};
		Datum		v[2];
		bool		isnull[2];

		if (lease_step(tokens[i], &key) &&
			orch_row_fetch_match(&token_run_source, &key, &lease, false, v, isnull))
			runs[nruns++] = v[0];
	}
	qsort(runs, nruns, sizeof(Datum), uuid_datum_cmp);
	for (int i = 0; i < nruns; i++)
		if (i == 0 || uuid_datum_cmp(&runs[i - 1], &runs[i]) != 0)
			(void) orch_row_fetch(&run_lock_source, &runs[i], true, NULL, NULL);
	MemoryContextSwitchTo(oldcxt);

	for (int i = 0; i < n; i++)
		if (fetch_task_by_token(tokens[i], cxt, &steps[nfound]))
			nfound++;
	*steps_out = steps;
	return nfound;
}

/* ------------------------------------------------------------------------
 * Running code that may fail, in a subtransaction
 * ------------------------------------------------------------------------ */

typedef Datum (*StepCallback) (ClaimedStep *s, void *arg);

/*
 * Call cb in a subtransaction.  On success returns true with the result
 * (allocated in the caller's memory context); on error rolls the
 * subtransaction back and returns false with the error copied to *edata.
 */
static bool
run_in_subxact(StepCallback cb, ClaimedStep *s, void *arg, Datum *result, ErrorData **edata)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	bool		ok;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);

	PG_TRY();
	{
		*result = cb(s, arg);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ok = true;
	}
	PG_CATCH();
	{
		/* a step that failed before its timeout must not leave it armed */
		if (get_timeout_active(STATEMENT_TIMEOUT))
			disable_timeout(STATEMENT_TIMEOUT, false);
		orch_audit_clear_step();
		MemoryContextSwitchTo(oldcxt);
		*edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcxt);
		CurrentResourceOwner = oldowner;
		ok = false;
	}
	PG_END_TRY();

	return ok;
}

/*
 * Call one of the jsonb_path_* functions on the step's context, not silent:
 * an error in the path is an error of the step.
 */
static Datum
jsonpath_over_ctx(PGFunction fn, ClaimedStep *s, Datum path, bool *isnull)
{
	LOCAL_FCINFO(fcinfo, 4);
	Datum		res;

	InitFunctionCallInfoData(*fcinfo, NULL, 4, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = s->ctx;
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = path;
	fcinfo->args[1].isnull = false;
	fcinfo->args[2].value = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	fcinfo->args[2].isnull = false;
	fcinfo->args[3].value = BoolGetDatum(false);
	fcinfo->args[3].isnull = false;
	res = fn(fcinfo);
	*isnull = fcinfo->isnull;
	return res;
}

/* The step's guard over its context: true, false, or an error. */
static Datum
eval_guard(ClaimedStep *s, void *arg)
{
	bool		isnull;
	Datum		res = jsonpath_over_ctx(jsonb_path_match, s, s->guard, &isnull);

	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_SQL_JSON_SCALAR_REQUIRED),
				 errmsg("\"when\" guard of step \"%s\" did not yield a boolean", s->name)));
	return res;
}

/* The end of a sleep with "until": a timestamp found in the context. */
static Datum
eval_until(ClaimedStep *s, void *arg)
{
	bool		isnull;
	Datum		found = jsonpath_over_ctx(jsonb_path_query_first, s, s->sleep_until, &isnull);
	Jsonb	   *jb;
	JsonbValue	v;

	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_SQL_JSON_ITEM_CANNOT_BE_CAST_TO_TARGET_TYPE),
				 errmsg("\"until\" of sleep step \"%s\" found nothing in the run context", s->name)));
	jb = DatumGetJsonbP(found);
	if (!JsonbExtractScalar(&jb->root, &v) || v.type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_SQL_JSON_ITEM_CANNOT_BE_CAST_TO_TARGET_TYPE),
				 errmsg("\"until\" of sleep step \"%s\" must find a timestamp string", s->name)));
	return DirectFunctionCall3(timestamptz_in,
							   CStringGetDatum(pnstrdup(v.val.string.val, v.val.string.len)),
							   ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
}

static int64
interval_usecs(const Interval *iv)
{
	return iv->time + (int64) iv->day * USECS_PER_DAY +
		(int64) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;
}

/*
 * Call a function of the step (arg: a StepCall; NULL for the step's own) as
 * the run's owner, with the step's timeout as statement timeout.
 */
/*
 * What is wrong with value against one of the step's schemas (what: "input"
 * or "output"), or NULL if it matches or there is no schema.
 */
static char *
schema_violation(ClaimedStep *s, Datum schema, Datum value, const char *what)
{
	char	   *path;
	char	   *message;

	if (schema == (Datum) 0 ||
		!orch_schema_first_violation(DatumGetJsonbP(value), DatumGetJsonbP(schema), &path,
									 &message))
		return NULL;
	return psprintf("%s of step \"%s\" does not match its %s_schema at %s: %s",
					what, s->name, what, path, message);
}

static Datum
call_step_function(ClaimedStep *s, void *arg)
{
	LOCAL_FCINFO(fcinfo, 1);
	FmgrInfo	flinfo;
	Oid			owner;
	Oid			save_userid;
	int			save_sec_context;
	AclResult	aclresult;
	Datum		result;
	StepCall	own = {s->function, s->function_name, "function"};
	StepCall   *call = arg ? (StepCall *) arg : &own;

	owner = get_role_oid(s->owner, true);
	if (!OidIsValid(owner))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("role \"%s\", owner of the run, no longer exists", s->owner)));
	if (!OidIsValid(call->fn) ||
		!SearchSysCacheExists1(PROCOID, ObjectIdGetDatum(call->fn)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("%s %s(jsonb) of step \"%s\" no longer exists",
						call->role, call->fn_name, s->name),
				 errhint("Define the workflow again after creating the function.")));
	aclresult = pg_proc_aclcheck(call->fn, owner, ACL_EXECUTE);
	if (aclresult != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" may not execute %s %s of step \"%s\"",
						s->owner, call->role, call->fn_name, s->name),
				 errhint("GRANT EXECUTE on the function to the role that starts the runs.")));
	if (call == &own)
	{
		char	   *bad = schema_violation(s, s->input_schema, s->ctx, "input");

		if (bad != NULL)
			ereport(ERROR, (errcode(ERRCODE_ORCH_INVALID), errmsg_internal("%s", bad)));
	}

	fmgr_info(call->fn, &flinfo);

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(owner, save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	if (s->timeout != NULL)
	{
		int64		ms = interval_usecs(s->timeout) / 1000;

		enable_timeout_after(STATEMENT_TIMEOUT, (int) Min(Max(ms, 1), INT_MAX));
	}
	PushActiveSnapshot(GetTransactionSnapshot());

	InitFunctionCallInfoData(*fcinfo, &flinfo, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = s->ctx;
	fcinfo->args[0].isnull = false;
	/* the business-table changes it makes are audited with this step */
	orch_audit_set_step(s->run_id, s->step_id);
	result = FunctionCallInvoke(fcinfo);
	orch_audit_clear_step();
	if (fcinfo->isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s %s of step \"%s\" returned NULL", call->role, call->fn_name, s->name),
				 errhint("Return a jsonb value, such as '{}', for a step with nothing to report.")));
	/* the result may point into memory that the subtransaction frees */
	result = PointerGetDatum(PG_DETOAST_DATUM_COPY(result));

	PopActiveSnapshot();
	if (s->timeout != NULL)
		disable_timeout(STATEMENT_TIMEOUT, false);
	SetUserIdAndSecContext(save_userid, save_sec_context);

	/* an output that does not match undoes the step's effect with it */
	if (call == &own)
	{
		char	   *bad = schema_violation(s, s->output_schema, result, "output");

		if (bad != NULL)
			ereport(ERROR, (errcode(ERRCODE_ORCH_INVALID), errmsg_internal("%s", bad)));
	}
	return result;
}

/* ------------------------------------------------------------------------
 * Recording outcomes
 * ------------------------------------------------------------------------ */

static Datum
jsonb_from_cstring(const char *s)
{
	return DirectFunctionCall1(jsonb_in, CStringGetDatum(s));
}

/* The output of a skipped step: {"skipped": why}. */
static Datum
skipped_because(const char *why)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"skipped\": ");
	escape_json(&buf, why);
	appendStringInfoChar(&buf, '}');
	return jsonb_from_cstring(buf.data);
}

static void
json_add_field(StringInfo buf, const char *key, const char *value, bool *first)
{
	if (value == NULL)
		return;
	appendStringInfoString(buf, *first ? "" : ", ");
	escape_json(buf, key);
	appendStringInfoString(buf, ": ");
	escape_json(buf, value);
	*first = false;
}

/*
 * The class of an error.  A step function chooses it by raising one of
 * orchestrator's own SQLSTATEs; otherwise it follows from the SQLSTATE:
 * errors that may well go away on their own are transient.
 */

static const char *
error_class_of(int sqlerrcode)
{
	if (sqlerrcode == ERRCODE_ORCH_TRANSIENT)
		return "transient";
	if (sqlerrcode == ERRCODE_ORCH_PERMANENT)
		return "permanent";
	if (sqlerrcode == ERRCODE_ORCH_UNKNOWN_OUTCOME)
		return "unknown_outcome";
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_TO_CATEGORY(ERRCODE_TRANSACTION_ROLLBACK):	/* 40: serialization, deadlock */
		case ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_EXCEPTION): /* 08 */
		case ERRCODE_TO_CATEGORY(ERRCODE_INSUFFICIENT_RESOURCES):	/* 53 */
		case ERRCODE_TO_CATEGORY(ERRCODE_OPERATOR_INTERVENTION):	/* 57: cancel, timeout */
		case ERRCODE_TO_CATEGORY(ERRCODE_SYSTEM_ERROR): /* 58 */
			return "transient";
		default:
			break;
	}
	if (sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE)	/* 55P03 */
		return "transient";
	return "permanent";
}

/* Might an error of this SQLSTATE go away on its own (a deadlock, a cancel)? */
bool
orch_error_is_transient(int sqlerrcode)
{
	return strcmp(error_class_of(sqlerrcode), "transient") == 0;
}

static Datum
error_json_routed(ClaimedStep *s, int attempt, ErrorData *e, const char *class,
				  const char *gave_up, const char *routed_to)
{
	StringInfoData buf;
	bool		first = true;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	json_add_field(&buf, "step", s->name, &first);
	appendStringInfo(&buf, ", \"attempt\": %d", attempt);
	json_add_field(&buf, "class", class, &first);
	json_add_field(&buf, "sqlstate", unpack_sql_state(e->sqlerrcode), &first);
	json_add_field(&buf, "message", e->message, &first);
	json_add_field(&buf, "detail", e->detail, &first);
	json_add_field(&buf, "hint", e->hint, &first);
	json_add_field(&buf, "context", e->context, &first);
	json_add_field(&buf, "gave_up", gave_up, &first);
	json_add_field(&buf, "routed_to", routed_to, &first);
	appendStringInfoChar(&buf, '}');
	return jsonb_from_cstring(buf.data);
}

/* The error of a step's attempt, as steps.error and the run's error record it. */
static Datum
error_json(ClaimedStep *s, int attempt, ErrorData *e, const char *class, const char *gave_up)
{
	return error_json_routed(s, attempt, e, class, gave_up, NULL);
}

static void
record_attempt_kind(ClaimedStep *s, const char *kind, int attempt, const char *worker,
					TimestampTz started, TimestampTz finished, bool ok, ErrorData *e,
					const char *class)
{
	Datum		v[14];
	bool		n[14] = {0};

	v[0] = Int64GetDatum(s->step_id);
	v[1] = Int32GetDatum(attempt);
	v[2] = s->run_id;
	v[3] = CStringGetTextDatum(worker);
	v[4] = TimestampTzGetDatum(started);
	v[5] = TimestampTzGetDatum(finished);
	v[6] = CStringGetTextDatum(ok ? "succeeded" : "failed");
	if (e == NULL)
		memset(n + 7, true, 6);
	else
	{
		/* a verdict without an error (ok) is recorded by its message alone */
		const char *texts[6] = {class,
			e->sqlerrcode != 0 ? unpack_sql_state(e->sqlerrcode) : NULL,
		e->message, e->detail, e->hint, e->context};

		for (int i = 0; i < 6; i++)
		{
			v[7 + i] = texts[i] ? CStringGetTextDatum(texts[i]) : (Datum) 0;
			n[7 + i] = texts[i] == NULL;
		}
	}
	v[13] = CStringGetTextDatum(kind);
	buffer_add(&attempt_rows, v, n);
}

/* A try of the step itself. */
static void
record_attempt(ClaimedStep *s, int attempt, const char *worker, TimestampTz started,
			   TimestampTz finished, ErrorData *e, const char *class)
{
	record_attempt_kind(s, "run", attempt, worker, started, finished, e == NULL, e, class);
}

/* The run has moved: one step fewer to go if finished is 1. */
static void
run_step_done(ClaimedStep *s, int finished)
{
	Datum		v[2] = {s->run_id, Int32GetDatum(finished)};

	buffer_add(&run_rows, v, NULL);
}

/* Is name one of the steps the step's on_error goes to? */
static bool
is_route(ClaimedStep *s, Datum name)
{
	Datum	   *elems;
	int			nelems;

	if (s->routes == (Datum) 0)
		return false;
	deconstruct_array(DatumGetArrayTypeP(s->routes), TEXTOID, -1, false,
					  TYPALIGN_INT, &elems, NULL, &nelems);
	for (int i = 0; i < nelems; i++)
	{
		if (DatumGetBool(DirectFunctionCall2Coll(texteq, C_COLLATION_OID, elems[i], name)))
			return true;
	}
	return false;
}

/*
 * A step finished: succeeded, skipped, or failed and routed to route_to.
 * Its dependents may be ready.  A dependent counts it as succeeded only if
 * it did; the step that on_error routes to counts it as succeeded only if
 * the run was routed there, so that it runs then and is skipped otherwise.
 */
static void
finish_step_routed(ClaimedStep *s, const char *status, Datum output, Datum error,
				   int attempt, const char *route_to)
{
	Datum		v[6];
	bool		n[6] = {0};
	bool		succeeded = strcmp(status, "succeeded") == 0;
	Datum	   *deps;
	int			ndeps;

	v[0] = Int64GetDatum(s->step_id);
	v[1] = CStringGetTextDatum(status);
	v[2] = output;
	n[2] = output == (Datum) 0;
	v[3] = error;
	n[3] = error == (Datum) 0;
	v[4] = Int32GetDatum(attempt);
	v[5] = TimestampTzGetDatum(GetCurrentTimestamp());
	buffer_add(&finish_rows, v, n);

	deconstruct_array(DatumGetArrayTypeP(s->dependents), TEXTOID, -1, false,
					  TYPALIGN_INT, &deps, NULL, &ndeps);
	for (int i = 0; i < ndeps; i++)
	{
		int			ok;
		Datum		pv[3];

		if (route_to != NULL)
			ok = strcmp(TextDatumGetCString(deps[i]), route_to) == 0;
		else
			ok = succeeded && !is_route(s, deps[i]);
		pv[0] = s->run_id;
		pv[1] = deps[i];
		pv[2] = Int32GetDatum(ok);
		buffer_add(&propagate_rows, pv, NULL);
	}
	run_step_done(s, 1);
}

/* A step finished with succeeded or skipped: its dependents may be ready. */
static void
finish_step(ClaimedStep *s, const char *status, Datum output, int attempt)
{
	finish_step_routed(s, status, output, (Datum) 0, attempt, NULL);
}

static void
defer_step_phase(ClaimedStep *s, const char *status, TimestampTz wake_at, int attempt,
				 Datum error, const char *phase)
{
	Datum		v[6];
	bool		n[6] = {0};

	v[0] = Int64GetDatum(s->step_id);
	v[1] = CStringGetTextDatum(status);
	v[2] = TimestampTzGetDatum(wake_at);
	n[2] = wake_at == 0;		/* no timer: a task waiting for a worker */
	if (wake_at != 0 && wake_at != DT_NOEND &&
		(batch_min_timer == 0 || wake_at < batch_min_timer))
		batch_min_timer = wake_at;
	v[3] = Int32GetDatum(attempt);
	v[4] = error;
	n[4] = error == (Datum) 0;
	v[5] = phase ? CStringGetTextDatum(phase) : (Datum) 0;
	n[5] = phase == NULL;
	buffer_add(&defer_rows, v, n);
}

/* The step waits, for a time or for someone; it is run (again) when due. */
static void
defer_step(ClaimedStep *s, const char *status, TimestampTz wake_at, int attempt, Datum error)
{
	defer_step_phase(s, status, wake_at, attempt, error, NULL);
}

/*
 * The run ended without succeeding: arm the compensation of the latest
 * finished step that has one, so that compensations run one at a time in
 * reverse completion order.  Returns false when none is left.
 */
static bool
compensate_next(Datum run_id, OrchBatchResult *result)
{
	bool		isnull;
	bool		armed;

	exec_plan(P_COMPENSATE_NEXT, &run_id, NULL, SPI_OK_SELECT);
	armed = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
									   &isnull));
	SPI_freetuptable(SPI_tuptable);
	if (armed)
		result->made_ready = ready_elsewhere = true;
	return armed;
}

/* The rare single-step writes of verifications and compensations. */
static void
step_set(ClaimedStep *s, const char *status, TimestampTz wake_at, Datum error,
		 const char *phase, int compensations)
{
	Datum		v[6];
	char		n[7] = "      ";

	v[0] = Int64GetDatum(s->step_id);
	v[1] = CStringGetTextDatum(status);
	v[2] = TimestampTzGetDatum(wake_at);
	if (wake_at == 0)
		n[2] = 'n';
	else if (batch_min_timer == 0 || wake_at < batch_min_timer)
		batch_min_timer = wake_at;
	v[3] = error;
	if (error == (Datum) 0)
		n[3] = 'n';
	v[4] = phase ? CStringGetTextDatum(phase) : (Datum) 0;
	if (phase == NULL)
		n[4] = 'n';
	v[5] = Int32GetDatum(compensations);
	exec_plan(P_STEP_SET, v, n, SPI_OK_UPDATE);
}

/*
 * The step failed for good: so does its run, naming the step.  Written at
 * once, after everything buffered before it, so that the run's unfinished
 * steps are cancelled over their latest state.
 */
/*
 * The runs an SPI result lists (one uuid column) were cancelled in this
 * batch: like runs that failed in it, their other claimed steps must not be
 * advanced.  Frees the result.
 */
static void
forget_cancelled_runs(void)
{
	MemoryContext oldcxt = MemoryContextSwitchTo(batch_cxt);

	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			failed_runs = lappend(failed_runs, DatumGetUUIDP(datumCopy(d, false, UUID_LEN)));
	}
	MemoryContextSwitchTo(oldcxt);
	SPI_freetuptable(SPI_tuptable);
}

static void
fail_step(ClaimedStep *s, Datum error, int attempt, TimestampTz now, OrchBatchResult *result)
{
	Datum		v[6];
	bool		n[6] = {0};
	Datum		rv[3] = {s->run_id, error, TimestampTzGetDatum(now)};
	Datum		cv[2] = {s->run_id, TimestampTzGetDatum(now)};
	MemoryContext oldcxt;

	v[0] = Int64GetDatum(s->step_id);
	v[1] = CStringGetTextDatum("failed");
	n[2] = true;
	v[3] = error;
	v[4] = Int32GetDatum(attempt);
	v[5] = TimestampTzGetDatum(GetCurrentTimestamp());
	buffer_add(&finish_rows, v, n);
	flush_all(now, result);

	/* child runs first: see orch._cancel_children */
	exec_plan(P_CANCEL_CHILDREN, &s->run_id, NULL, SPI_OK_SELECT);
	forget_cancelled_runs();
	exec_plan(P_RUN_CANCEL_STEPS, cv, NULL, SPI_OK_UPDATE);
	exec_plan(P_RUN_FAIL, rv, NULL, SPI_OK_UPDATE);
	result->runs_finished++;
	compensate_next(s->run_id, result);
	oldcxt = MemoryContextSwitchTo(batch_cxt);
	failed_runs = lappend(failed_runs, DatumGetUUIDP(s->run_id));
	MemoryContextSwitchTo(oldcxt);
}

/* Nobody can tell what happened, or what to do next: a human decides. */
static void
to_human(ClaimedStep *s, int attempt, Datum error, TimestampTz now, OrchBatchResult *result)
{
	Datum		rv[1] = {s->run_id};

	defer_step(s, "needs_human", 0, attempt, error);
	run_step_done(s, 0);
	flush_all(now, result);
	exec_plan(P_RUN_NEEDS_HUMAN, rv, NULL, SPI_OK_UPDATE);
	result->runs_finished++;	/* nothing more happens by itself: wake wait_run */
}

/*
 * Where the step's on_error rules send an error of this class and SQLSTATE:
 * true with the step in *target, or with *target NULL for a rule that sends
 * it to a human; false if no rule matches.
 */
static bool
match_route(ClaimedStep *s, const char *class, int sqlerrcode, char **target)
{
	Datum		v[3];
	bool		matched;

	*target = NULL;
	if (s->on_error == (Datum) 0)
		return false;
	v[0] = s->on_error;
	v[1] = CStringGetTextDatum(class);
	v[2] = CStringGetTextDatum(unpack_sql_state(sqlerrcode));
	exec_plan(P_ROUTE, v, NULL, SPI_OK_SELECT);
	matched = SPI_processed > 0;
	if (matched)
		*target = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	SPI_freetuptable(SPI_tuptable);
	return matched;
}

/*
 * If an on_error rule matches, true is returned and either the step fails
 * and the run goes on at the rule's step, which finds the error in its
 * context; or, for a "human" rule, the step waits in the human queue.
 */
static bool
route_failure(ClaimedStep *s, int attempt, ErrorData *e, const char *class,
			  const char *gave_up, TimestampTz now, OrchBatchResult *result)
{
	char	   *target;
	Datum		error;
	Datum		cv[3];

	if (!match_route(s, class, e->sqlerrcode, &target))
		return false;
	if (target == NULL)
	{
		to_human(s, attempt,
				 error_json(s, attempt, e, class,
							psprintf("%s; on_error sent it to a human", gave_up)),
				 now, result);
		return true;
	}
	error = error_json_routed(s, attempt, e, class, gave_up, target);
	cv[0] = s->run_id;
	cv[1] = CStringGetTextDatum(target);
	cv[2] = error;
	exec_plan(P_SET_CAUSE, cv, NULL, SPI_OK_UPDATE);
	finish_step_routed(s, "failed", (Datum) 0, error, attempt, target);
	return true;
}

/* The step failed for good: routed by on_error, or failing its run. */
static void
give_up(ClaimedStep *s, int attempt, ErrorData *e, const char *class, const char *gave_up,
		TimestampTz now, OrchBatchResult *result)
{
	if (!route_failure(s, attempt, e, class, gave_up, now, result))
		fail_step(s, error_json(s, attempt, e, class, gave_up), attempt, now, result);
}

/* Does the retry policy list this error's class or SQLSTATE as final? */
static bool
is_non_retryable(ClaimedStep *s, const char *class, int sqlerrcode)
{
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	const char *code = unpack_sql_state(sqlerrcode);

	if (s->non_retryable == (Datum) 0)
		return false;
	deconstruct_array(DatumGetArrayTypeP(s->non_retryable), TEXTOID, -1, false,
					  TYPALIGN_INT, &elems, &nulls, &nelems);
	for (int i = 0; i < nelems; i++)
	{
		char	   *item = TextDatumGetCString(elems[i]);

		if (strcmp(item, class) == 0 || strcmp(item, code) == 0)
			return true;
	}
	return false;
}

/* Delay before attempt number attempt + 1, after attempt failed. */
static int64
retry_delay_usecs(ClaimedStep *s, int attempt)
{
	double		initial = (double) interval_usecs(s->initial_interval);
	double		cap = (double) interval_usecs(s->max_interval);
	double		delay = initial * pow(s->backoff_coefficient, attempt - 1);

	if (!(delay <= cap))		/* also catches overflow to inf */
		delay = cap;
	if (s->jitter)
		delay = pg_prng_double(&pg_global_prng_state) * delay;
	return (int64) delay;
}

/* ------------------------------------------------------------------------
 * The state machine of one step
 * ------------------------------------------------------------------------ */

/* ready -> skipped when the guard is false or every need was skipped */
static bool
maybe_skip(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	Datum		guard_result;
	ErrorData  *edata = NULL;

	if (s->n_needs > 0 && s->needs_ok == 0)
	{
		finish_step(s, "skipped",
					skipped_because(s->route_target ? "no on_error rule routed the run to it" :
									"every step it needs was skipped"),
					s->attempt);
		return true;
	}
	if (s->guard == (Datum) 0)
		return false;
	if (!run_in_subxact(eval_guard, s, NULL, &guard_result, &edata))
	{
		/* a guard that cannot be evaluated is a permanent error of the step */
		record_attempt(s, s->attempt + 1, worker, now, GetCurrentTimestamp(), edata, "permanent");
		give_up(s, s->attempt + 1, edata, "permanent", NULL, now, result);
		return true;
	}
	if (!DatumGetBool(guard_result))
	{
		finish_step(s, "skipped", skipped_because("its when guard was false"), s->attempt);
		return true;
	}
	return false;
}

static void
advance_sleep(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	TimestampTz until;
	Datum		d;
	ErrorData  *edata = NULL;

	if (strcmp(s->status, "waiting") == 0)
	{
		StringInfoData buf;

		initStringInfo(&buf);
		appendStringInfo(&buf, "{\"slept_until\": \"%s\"}", timestamptz_to_str(s->wake_at));
		finish_step(s, "succeeded", jsonb_from_cstring(buf.data), s->attempt);
		return;
	}
	if (maybe_skip(s, worker, now, result))
		return;

	if (s->sleep_for != NULL)
		until = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
														TimestampTzGetDatum(now),
														IntervalPGetDatum(s->sleep_for)));
	else if (run_in_subxact(eval_until, s, NULL, &d, &edata))
		until = DatumGetTimestampTz(d);
	else
	{
		record_attempt(s, s->attempt + 1, worker, now, GetCurrentTimestamp(), edata, "permanent");
		give_up(s, s->attempt + 1, edata, "permanent", NULL, now, result);
		return;
	}

	defer_step(s, "waiting", until, s->attempt, (Datum) 0);
	run_step_done(s, 0);
	/* the wake-up for an "until" already past is the next batch */
}

/* ------------------------------------------------------------------------
 * Circuit breakers
 * ------------------------------------------------------------------------ */

static OpenedCircuit *
opened_in_batch(const char *name)
{
	ListCell   *lc;

	foreach(lc, opened_circuits)
	{
		OpenedCircuit *oc = lfirst(lc);

		if (strcmp(oc->name, name) == 0)
			return oc;
	}
	return NULL;
}

/*
 * May the step call its target now?  A closed circuit lets it; an open one
 * whose cooldown has passed lets one step through as the probe; otherwise
 * the step waits, blocked, without burning an attempt.
 */
static bool
circuit_admits(ClaimedStep *s, TimestampTz now)
{
	OpenedCircuit *oc;
	TimestampTz wake;
	Datum		arg;

	if (s->circuit == NULL)
		return true;
	oc = opened_in_batch(s->circuit);
	if (oc == NULL && strcmp(s->circuit_state, "closed") == 0)
		return true;

	wake = oc ? oc->probe_after : s->circuit_probe_after;
	if (oc == NULL && strcmp(s->circuit_state, "open") == 0 && wake <= now)
	{
		arg = CStringGetTextDatum(s->circuit);
		exec_plan(P_CIRCUIT_PROBE, &arg, NULL, SPI_OK_UPDATE_RETURNING);
		if (SPI_processed > 0)
			return true;		/* this step is the probe */
	}
	/* half open (a probe is out), or still cooling down */
	if (wake <= now)
		wake = now + USECS_PER_SEC;
	defer_step(s, "blocked", wake, s->attempt, (Datum) 0);
	run_step_done(s, 0);
	return false;
}

/* The step's call went through, or failed with an error of this class. */
static void
circuit_record(ClaimedStep *s, const char *class)
{
	Datum		arg;

	if (s->circuit == NULL)
		return;
	arg = CStringGetTextDatum(s->circuit);
	if (class == NULL)
	{
		/* a healthy closed circuit is not written to */
		if (strcmp(s->circuit_state, "closed") != 0 || s->circuit_failures > 0 ||
			opened_in_batch(s->circuit) != NULL)
		{
			exec_plan(P_CIRCUIT_CLOSE, &arg, NULL, SPI_OK_UPDATE);
			opened_circuits = list_delete_ptr(opened_circuits, opened_in_batch(s->circuit));
		}
		return;
	}
	/* a permanent error says nothing about the target's health */
	if (strcmp(class, "permanent") == 0)
		return;
	exec_plan(P_CIRCUIT_FAIL, &arg, NULL, SPI_OK_UPDATE_RETURNING);
	if (SPI_processed > 0)
	{
		bool		isnull;
		bool		opened = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
														SPI_tuptable->tupdesc, 1, &isnull));

		if (opened && opened_in_batch(s->circuit) == NULL)
		{
			MemoryContext oldcxt = MemoryContextSwitchTo(batch_cxt);
			OpenedCircuit *oc = palloc(sizeof(OpenedCircuit));

			oc->name = pstrdup(s->circuit);
			oc->probe_after = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[0],
																SPI_tuptable->tupdesc, 2,
																&isnull));
			opened_circuits = lappend(opened_circuits, oc);
			MemoryContextSwitchTo(oldcxt);
		}
	}
}

/*
 * Attempt number attempt of the step failed with an error of this class
 * (already recorded): retry it, give up, or hand it to a human.
 */
static void
handle_failure(ClaimedStep *s, int attempt, TimestampTz started, ErrorData *edata,
			   const char *class, TimestampTz now, OrchBatchResult *result)
{
	const char *gave_up;

	if (strcmp(class, "unknown_outcome") == 0)
	{
		/*
		 * The step may or may not have had its effect: never run it again
		 * blindly.  Its verify function finds out, at once, in the engine;
		 * without one an on_error rule may route the run on, or else a
		 * human (or orch.retry_run) decides.
		 */
		if (OidIsValid(s->verify))
		{
			defer_step_phase(s, "retrying", GetCurrentTimestamp(), attempt,
							 error_json(s, attempt, edata, class, NULL), "verify");
			run_step_done(s, 0);
			return;
		}
		if (route_failure(s, attempt, edata, class, "the outcome is unknown", now, result))
			return;
		to_human(s, attempt, error_json(s, attempt, edata, class, "the outcome is unknown"),
				 now, result);
		return;
	}

	if (edata->sqlerrcode == ERRCODE_ORCH_INVALID)
		gave_up = "it failed validation";	/* the same input, or code, fails again */
	else if (is_non_retryable(s, class, edata->sqlerrcode))
		gave_up = "the error is not retryable";
	else if (s->max_attempts > 0 && attempt - s->attempt_base >= s->max_attempts)
		gave_up = "no attempts left";
	else
	{
		TimestampTz wake = GetCurrentTimestamp() + retry_delay_usecs(s, attempt - s->attempt_base);
		TimestampTz first = s->started_at != 0 ? s->started_at : started;

		if (s->schedule_to_close != NULL &&
			wake > first + interval_usecs(s->schedule_to_close))
			gave_up = "the next attempt would start after schedule_to_close";
		else
		{
			defer_step(s, "retrying", wake, attempt, error_json(s, attempt, edata, class, NULL));
			run_step_done(s, 0);
			return;
		}
	}
	give_up(s, attempt, edata, class, gave_up, now, result);
}

/*
 * Attempt s->attempt ended with an unknown outcome: the step's verify
 * function reads back the state the step would have changed and answers
 * {"applied": true, "output": ...} (the step succeeded), {"applied": false}
 * (it did not happen: a transient failure, retried by the policy), or
 * anything else (a human decides).  Recorded as an attempt of kind verify.
 */
static void
advance_verify(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	StepCall	call = {s->verify, s->verify_name, "verify function"};
	TimestampTz started = GetCurrentTimestamp();
	Datum		answer;
	ErrorData  *edata = NULL;
	ErrorData	verdict;
	Jsonb	   *jb;
	JsonbValue *applied = NULL;

	if (!run_in_subxact(call_step_function, s, &call, &answer, &edata))
	{
		const char *class = error_class_of(edata->sqlerrcode);

		record_attempt_kind(s, "verify", s->attempt, worker, started, GetCurrentTimestamp(),
							false, edata, class);
		to_human(s, s->attempt,
				 error_json(s, s->attempt, edata, class, "its verify function failed"),
				 now, result);
		return;
	}

	jb = DatumGetJsonbP(answer);
	if (JB_ROOT_IS_OBJECT(jb))
		applied = getKeyJsonValueFromContainer(&jb->root, "applied", 7, NULL);

	memset(&verdict, 0, sizeof(verdict));
	if (applied != NULL && applied->type == jbvBool && applied->val.boolean)
	{
		JsonbValue *out = getKeyJsonValueFromContainer(&jb->root, "output", 6, NULL);

		verdict.message = "verified: the attempt took effect";
		record_attempt_kind(s, "verify", s->attempt, worker, started, GetCurrentTimestamp(),
							true, &verdict, NULL);
		finish_step(s, "succeeded",
					out ? JsonbPGetDatum(JsonbValueToJsonb(out)) : jsonb_from_cstring("{}"),
					s->attempt);
		return;
	}
	if (applied != NULL && applied->type == jbvBool)
	{
		ErrorData	e;

		verdict.message = "verified: the attempt did not take effect";
		record_attempt_kind(s, "verify", s->attempt, worker, started, GetCurrentTimestamp(),
							true, &verdict, NULL);
		memset(&e, 0, sizeof(e));
		e.sqlerrcode = ERRCODE_ORCH_TRANSIENT;
		e.message = psprintf("attempt %d of step \"%s\" did not take effect (verified by %s)",
							 s->attempt, s->name, s->verify_name);
		handle_failure(s, s->attempt, s->started_at != 0 ? s->started_at : started, &e,
					   "transient", now, result);
		return;
	}

	verdict.sqlerrcode = ERRCODE_ORCH_UNKNOWN_OUTCOME;
	verdict.message = psprintf("verify function %s did not decide: it answered %s",
							   s->verify_name, JsonbToCString(NULL, &jb->root, VARSIZE(jb)));
	verdict.hint = "Answer {\"applied\": true, \"output\": {...}} or {\"applied\": false}.";
	record_attempt_kind(s, "verify", s->attempt, worker, started, GetCurrentTimestamp(),
						false, &verdict, "unknown_outcome");
	to_human(s, s->attempt,
			 error_json(s, s->attempt, &verdict, "unknown_outcome", "its verify function did not decide"),
			 now, result);
}

/*
 * Undo a step of a run that failed, was cancelled or timed out, with its
 * compensate function; then arm the one before it.  A transient error is
 * retried by the step's retry policy; any other, or running out of
 * attempts, stops the compensation there for a human (step needs_human).
 */
static void
advance_compensation(ClaimedStep *s, const char *worker, TimestampTz now,
					 OrchBatchResult *result)
{
	StepCall	call = {s->compensate, s->compensate_name, "compensate function"};
	int			try = s->compensations + 1;
	TimestampTz started = GetCurrentTimestamp();
	Datum		out;
	ErrorData  *edata = NULL;
	const char *class;

	if (run_in_subxact(call_step_function, s, &call, &out, &edata))
	{
		record_attempt_kind(s, "compensate", try, worker, started, GetCurrentTimestamp(),
							true, NULL, NULL);
		step_set(s, "compensated", 0, (Datum) 0, NULL, try);
		if (!compensate_next(s->run_id, result))
			result->runs_finished++;	/* compensated: wake wait_run */
		return;
	}

	class = error_class_of(edata->sqlerrcode);
	record_attempt_kind(s, "compensate", try, worker, started, GetCurrentTimestamp(),
						false, edata, class);
	if (strcmp(class, "transient") == 0 && !is_non_retryable(s, class, edata->sqlerrcode) &&
		(s->max_attempts == 0 || try < s->max_attempts))
	{
		step_set(s, "retrying", GetCurrentTimestamp() + retry_delay_usecs(s, try),
				 error_json(s, try, edata, class, NULL), "compensate", try);
		return;
	}
	step_set(s, "needs_human", 0,
			 error_json(s, try, edata, class, "its compensation failed"), "compensate", try);
	result->runs_finished++;	/* nothing more will happen by itself: wake wait_run */
}

/* ------------------------------------------------------------------------
 * Validation and review of what a step gets and gives
 * ------------------------------------------------------------------------ */

/*
 * Attempt number attempt failed validation (message says where): that is
 * final, routed by on_error if a rule matches (SQLSTATE ORVAL).
 */
static void
fail_validation(ClaimedStep *s, int attempt, const char *worker, TimestampTz started,
				char *message, TimestampTz now, OrchBatchResult *result)
{
	ErrorData	e;

	memset(&e, 0, sizeof(e));
	e.sqlerrcode = ERRCODE_ORCH_INVALID;
	e.message = message;
	record_attempt(s, attempt, worker, started, GetCurrentTimestamp(), &e, "permanent");
	give_up(s, attempt, &e, "permanent", "it failed validation", now, result);
}

/*
 * Does the step's review_if hold for its output?  A path that yields no
 * boolean does not.
 */
static bool
review_requested(ClaimedStep *s, Datum output)
{
	LOCAL_FCINFO(fcinfo, 4);
	Datum		res;

	if (s->review_if == (Datum) 0)
		return false;
	InitFunctionCallInfoData(*fcinfo, NULL, 4, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = output;
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = s->review_if;
	fcinfo->args[1].isnull = false;
	fcinfo->args[2].value = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	fcinfo->args[2].isnull = false;
	fcinfo->args[3].value = BoolGetDatum(true);	/* silent */
	fcinfo->args[3].isnull = false;
	res = jsonb_path_match(fcinfo);
	return !fcinfo->isnull && DatumGetBool(res);
}

/*
 * The step produced its output, which matched any output_schema: it
 * succeeds, unless review_if holds the output for a person first.  A held
 * step waits in needs_human with the output in its error (held_output);
 * orch.resolve(..., 'accept') lets it succeed with it.
 */
static void
step_produced(ClaimedStep *s, Datum output, int attempt, TimestampTz now,
			  OrchBatchResult *result)
{
	StringInfoData buf;
	Jsonb	   *out;

	if (!review_requested(s, output))
	{
		finish_step(s, "succeeded", output, attempt);
		return;
	}
	out = DatumGetJsonbP(output);
	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"step\": ");
	escape_json(&buf, s->name);
	appendStringInfo(&buf, ", \"attempt\": %d, \"message\": ", attempt);
	escape_json(&buf, psprintf("the output of step \"%s\" matched its review_if %s", s->name,
							   DatumGetCString(DirectFunctionCall1(jsonpath_out, s->review_if))));
	appendStringInfoString(&buf, ", \"gave_up\": \"its output is held for review\", \"held_output\": ");
	appendStringInfoString(&buf, JsonbToCString(NULL, &out->root, VARSIZE(out)));
	appendStringInfoChar(&buf, '}');
	to_human(s, attempt, jsonb_from_cstring(buf.data), now, result);
}

static void
advance_sql(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	int			attempt;
	TimestampTz started;
	Datum		output;
	ErrorData  *edata = NULL;
	const char *class;

	if (strcmp(s->status, "ready") == 0 && maybe_skip(s, worker, now, result))
		return;

	if (!circuit_admits(s, now))
		return;

	attempt = s->attempt + 1;
	started = GetCurrentTimestamp();
	result->executed++;
	if (run_in_subxact(call_step_function, s, NULL, &output, &edata))
	{
		record_attempt(s, attempt, worker, started, GetCurrentTimestamp(), NULL, NULL);
		circuit_record(s, NULL);
		step_produced(s, output, attempt, now, result);
		return;
	}

	class = error_class_of(edata->sqlerrcode);
	record_attempt(s, attempt, worker, started, GetCurrentTimestamp(), edata, class);
	circuit_record(s, class);
	handle_failure(s, attempt, started, edata, class, now, result);
}

/*
 * A task step is done by an external worker.  The engine queues it when it
 * is ready (or due again after a failed attempt), and looks at it again only
 * when its lease expires: a worker that claimed the task and went silent may
 * have done the work, so the outcome is unknown.
 */
static void
advance_task(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	if (strcmp(s->status, "running") == 0)
	{
		ErrorData	e;
		char		msg[256];

		/*
		 * The worker may have done the work: only a task declared idempotent
		 * may simply be done again.
		 */
		const char *class = s->idempotent ? "transient" : "unknown_outcome";

		memset(&e, 0, sizeof(e));
		snprintf(msg, sizeof(msg), "the lease of worker \"%s\" on task \"%s\" expired",
				 s->worker ? s->worker : "?", s->name);
		e.sqlerrcode = s->idempotent ? ERRCODE_ORCH_TRANSIENT : ERRCODE_ORCH_UNKNOWN_OUTCOME;
		e.message = msg;
		record_attempt(s, s->attempt, s->worker ? s->worker : worker,
					   s->attempt_started_at, GetCurrentTimestamp(), &e, class);
		circuit_record(s, class);
		handle_failure(s, s->attempt, s->attempt_started_at, &e, class, now, result);
		return;
	}
	if (strcmp(s->status, "waiting") == 0)
	{
		/* queued, and no worker claimed it in time */
		ErrorData	e;
		char		msg[256];
		int			attempt = s->attempt + 1;

		memset(&e, 0, sizeof(e));
		snprintf(msg, sizeof(msg), "no worker claimed task \"%s\" within its schedule_to_start",
				 s->name);
		e.sqlerrcode = ERRCODE_ORCH_TRANSIENT;
		e.message = msg;
		record_attempt(s, attempt, worker, s->wake_at - interval_usecs(s->schedule_to_start),
					   GetCurrentTimestamp(), &e, "transient");
		handle_failure(s, attempt, s->wake_at, &e, "transient", now, result);
		return;
	}
	if (strcmp(s->status, "ready") == 0 && maybe_skip(s, worker, now, result))
		return;
	if (!circuit_admits(s, now))
		return;
	if (s->input_schema != (Datum) 0)
	{
		char	   *bad = schema_violation(s, s->input_schema, s->ctx, "input");

		if (bad != NULL)
		{
			fail_validation(s, s->attempt + 1, worker, now, bad, now, result);
			return;
		}
	}

	/* ready, or retrying and due: into the queue, timed by schedule_to_start */
	defer_step(s, "waiting",
			   s->schedule_to_start ? now + interval_usecs(s->schedule_to_start) : 0,
			   s->attempt, (Datum) 0);
	run_step_done(s, 0);
	result->tasks_queued++;
}

/* ------------------------------------------------------------------------
 * Events
 * ------------------------------------------------------------------------ */

/* Take the first event for the step not yet taken: true, with its payload. */
static bool
take_event(ClaimedStep *s, Datum *payload)
{
	Datum		v[3] = {s->run_id, CStringGetTextDatum(s->event), Int64GetDatum(s->step_id)};
	bool		isnull;
	bool		taken;

	exec_plan(P_TAKE_EVENT, v, NULL, SPI_OK_UPDATE_RETURNING);
	taken = SPI_processed > 0;
	if (taken)
	{
		MemoryContext oldcxt = MemoryContextSwitchTo(rows_cxt);

		*payload = datumCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
										   &isnull), false, -1);
		MemoryContextSwitchTo(oldcxt);
	}
	SPI_freetuptable(SPI_tuptable);
	return taken;
}

/* No event came within the step's timeout: as its on_timeout says. */
static void
event_timed_out(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	ErrorData	e;
	int			attempt = s->attempt + 1;
	const char *gave_up = "no event came within its timeout";

	memset(&e, 0, sizeof(e));
	e.sqlerrcode = ERRCODE_ORCH_TIMED_OUT;
	e.message = psprintf("no event \"%s\" came within %s", s->event,
						 DatumGetCString(DirectFunctionCall1(interval_out,
															 IntervalPGetDatum(s->timeout))));
	record_attempt(s, attempt, worker, s->started_at, GetCurrentTimestamp(), &e, "permanent");
	if (strcmp(s->on_timeout, "skip") == 0)
	{
		finish_step(s, "skipped", skipped_because(e.message), attempt);
	}
	else if (strcmp(s->on_timeout, "human") == 0)
		to_human(s, attempt, error_json(s, attempt, &e, "permanent", gave_up), now, result);
	else
		give_up(s, attempt, &e, "permanent", gave_up, now, result);
}

/*
 * A wait_event step takes the first event of its name sent to its run and
 * not yet taken (maybe sent before the run got here), and succeeds with the
 * event's payload as its output.  Without one it waits: orch.send_event
 * wakes it, and its timeout, counted from when it began to wait, ends it.
 */
static void
advance_wait_event(ClaimedStep *s, const char *worker, TimestampTz now,
				   OrchBatchResult *result)
{
	bool		waiting = strcmp(s->status, "waiting") == 0;
	TimestampTz deadline = DT_NOEND;
	Datum		payload;

	if (!waiting && maybe_skip(s, worker, now, result))
		return;
	if (take_event(s, &payload))
	{
		char	   *bad = schema_violation(s, s->output_schema, payload, "output");

		if (bad != NULL)
			fail_validation(s, s->attempt + 1, worker, now,
							psprintf("the event's payload: %s", bad), now, result);
		else
			step_produced(s, payload, s->attempt, now, result);
		return;
	}
	if (s->timeout != NULL)
		deadline = (waiting && s->started_at != 0 ? s->started_at : now) +
			interval_usecs(s->timeout);
	if (waiting && now >= deadline)
	{
		event_timed_out(s, worker, now, result);
		return;
	}
	defer_step(s, "waiting", deadline, s->attempt, (Datum) 0);
	if (!waiting)
		run_step_done(s, 0);
}

/* A text field of a jsonb object, or NULL. */
static char *
jsonb_field_text(Datum jb, const char *key)
{
	JsonbValue *v = getKeyJsonValueFromContainer(&DatumGetJsonbP(jb)->root, key, strlen(key),
												 NULL);

	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/*
 * A person resolved the step, which waited for one (orch.resolve): it is
 * skipped, succeeds with the output they gave, or fails with its run.
 * (A retry needs nothing of the engine: resolve makes the step ready.)
 */
static void
advance_resolution(ClaimedStep *s, TimestampTz now, OrchBatchResult *result)
{
	char	   *action = s->resolution ? jsonb_field_text(s->resolution, "action") : NULL;
	char	   *by = s->resolution ? jsonb_field_text(s->resolution, "by") : NULL;
	char	   *reason = s->resolution ? jsonb_field_text(s->resolution, "reason") : NULL;

	if (action == NULL)
		elog(ERROR, "step " INT64_FORMAT " has no resolution to carry out", s->step_id);
	if (strcmp(action, "skip") == 0)
		finish_step(s, "skipped",
					skipped_because(psprintf("%s skipped it%s%s", by ? by : "a person",
											 reason ? ": " : "", reason ? reason : "")),
					s->attempt);
	else if (strcmp(action, "provide_input") == 0 || strcmp(action, "accept") == 0)
	{
		JsonbValue *data = getKeyJsonValueFromContainer(&DatumGetJsonbP(s->resolution)->root,
														"data", 4, NULL);

		if (data == NULL)
			elog(ERROR, "step " INT64_FORMAT " was resolved with %s but no data",
				 s->step_id, action);
		finish_step(s, "succeeded", JsonbPGetDatum(JsonbValueToJsonb(data)), s->attempt);
	}
	else if (strcmp(action, "fail") == 0)
	{
		ErrorData	e;

		memset(&e, 0, sizeof(e));
		e.sqlerrcode = ERRCODE_ORCH_PERMANENT;
		e.message = psprintf("%s failed the step%s%s", by ? by : "a person",
							 reason ? ": " : "", reason ? reason : "");
		fail_step(s, error_json(s, s->attempt, &e, "permanent", "a person failed it"),
				  s->attempt, now, result);
	}
	else
		elog(ERROR, "step " INT64_FORMAT " has an unknown resolution \"%s\"", s->step_id, action);
}

/* ------------------------------------------------------------------------
 * Approvals
 * ------------------------------------------------------------------------ */

/* The decision of a plan that returns one jsonb, copied out of SPI memory. */
static Datum
decision_of(int plan, Datum *args)
{
	bool		isnull;
	Datum		d;
	MemoryContext oldcxt;

	exec_plan(plan, args, NULL, SPI_OK_SELECT);
	oldcxt = MemoryContextSwitchTo(rows_cxt);
	d = datumCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull),
				  false, -1);
	MemoryContextSwitchTo(oldcxt);
	SPI_freetuptable(SPI_tuptable);
	return d;
}

#define ERRCODE_ORCH_REJECTED	MAKE_SQLSTATE('O','R','R','E','J')

/*
 * An approval step asks the members of a role (orch._advance_approval
 * keeps the requests): it waits in needs_approval, with its run, until the
 * request is decided or expires, and then succeeds with exactly what was
 * approved, or fails as rejected (SQLSTATE ORREJ, which on_reject routes),
 * or waits in the human queue.
 */
static void
advance_approval(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	bool		first = strcmp(s->status, "needs_approval") != 0;
	Datum		v[3] = {Int64GetDatum(s->step_id), s->ctx, BoolGetDatum(first)};
	Datum		decision;
	char	   *action;
	char	   *message;
	JsonbValue *jv;

	if (first && maybe_skip(s, worker, now, result))
		return;
	decision = decision_of(P_APPROVAL, v);
	action = jsonb_field_text(decision, "action");
	message = jsonb_field_text(decision, "message");

	if (strcmp(action, "succeed") == 0)
	{
		jv = getKeyJsonValueFromContainer(&DatumGetJsonbP(decision)->root, "output", 6, NULL);
		finish_step(s, "succeeded", JsonbPGetDatum(JsonbValueToJsonb(jv)), s->attempt);
	}
	else if (strcmp(action, "wait") == 0)
	{
		char	   *wake = jsonb_field_text(decision, "wake_at");
		TimestampTz wake_at = wake == NULL ? DT_NOEND :
			DatumGetTimestampTz(DirectFunctionCall3(timestamptz_in, CStringGetDatum(wake),
													ObjectIdGetDatum(InvalidOid),
													Int32GetDatum(-1)));
		Datum		rv[1] = {s->run_id};

		defer_step(s, "needs_approval", wake_at, s->attempt, (Datum) 0);
		if (first)
		{
			run_step_done(s, 0);
			flush_all(now, result);
			exec_plan(P_RUN_NEEDS_APPROVAL, rv, NULL, SPI_OK_UPDATE);
			result->runs_finished++;	/* it waits for people now: wake wait_run */
		}
	}
	else
	{
		ErrorData	e;
		int			attempt = s->attempt + 1;
		Datum		dv[2] = {s->run_id, Int64GetDatum(s->step_id)};

		/* the run no longer waits for this approval (the human queue may set it aside) */
		exec_plan(P_RUN_APPROVAL_DONE, dv, NULL, SPI_OK_SELECT);
		SPI_freetuptable(SPI_tuptable);
		memset(&e, 0, sizeof(e));
		e.sqlerrcode = ERRCODE_ORCH_REJECTED;
		e.message = message;
		record_attempt(s, attempt, worker, now, GetCurrentTimestamp(), &e, "permanent");
		if (strcmp(action, "human") == 0)
			to_human(s, attempt, error_json(s, attempt, &e, "permanent", "its approval expired"),
					 now, result);
		else
			give_up(s, attempt, &e, "permanent",
					strcmp(action, "reject") == 0 ? "its approval was rejected" : "its approval expired",
					now, result);
	}
}

/* ------------------------------------------------------------------------
 * Subworkflows
 * ------------------------------------------------------------------------ */

/*
 * A subworkflow or map step waiting for its children: their ends wake it,
 * and it looks at them at least this often (a wake can be skipped, see
 * orch._wake_parent_step).
 */
#define CHILD_RECHECK_USECS	(60 * USECS_PER_SEC)

/* Start the step's child run (in the step's subtransaction). */
static Datum
start_child(ClaimedStep *s, void *arg)
{
	Datum		v[2] = {Int64GetDatum(s->step_id), s->ctx};

	exec_plan(P_START_CHILD, v, NULL, SPI_OK_SELECT);
	return (Datum) 0;
}

/*
 * A subworkflow step starts a child run of its workflow, one per attempt,
 * and waits for it; the child's end wakes it (trigger runs_wake_parent).
 * The child's output is the step's; a child that fails, is cancelled or
 * times out fails the attempt, and the retry policy may start another.
 */
static void
advance_subworkflow(ClaimedStep *s, const char *worker, TimestampTz now,
					OrchBatchResult *result)
{
	ErrorData  *edata = NULL;
	Datum		child;
	char	   *status;
	bool		isnull;
	HeapTuple	tup;
	TupleDesc	desc;

	if (strcmp(s->status, "waiting") != 0)
	{
		int			attempt = s->attempt + 1;

		if (strcmp(s->status, "ready") == 0 && maybe_skip(s, worker, now, result))
			return;
		if (!run_in_subxact(start_child, s, NULL, &child, &edata))
		{
			const char *class = error_class_of(edata->sqlerrcode);

			record_attempt(s, attempt, worker, now, GetCurrentTimestamp(), edata, class);
			handle_failure(s, attempt, now, edata, class, now, result);
			return;
		}
		defer_step(s, "waiting", now + CHILD_RECHECK_USECS, attempt, (Datum) 0);
		run_step_done(s, 0);
		result->made_ready = ready_elsewhere = true;	/* the child's first steps */
		return;
	}

	exec_plan(P_CHILD, (Datum[]) {Int64GetDatum(s->step_id)}, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		elog(ERROR, "subworkflow step " INT64_FORMAT " waits for no child run", s->step_id);
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	status = get_text(tup, desc, 3);
	if (strcmp(status, "succeeded") == 0)
	{
		bool		no_output;
		Datum		output = get_copy(tup, desc, 4, &no_output);
		TimestampTz started = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));

		SPI_freetuptable(SPI_tuptable);
		record_attempt(s, s->attempt, worker, started, GetCurrentTimestamp(), NULL, NULL);
		finish_step(s, "succeeded", no_output ? jsonb_from_cstring("{}") : output, s->attempt);
	}
	else if (strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0 ||
			 strcmp(status, "timed_out") == 0)
	{
		ErrorData	e;
		char	   *child_id = SPI_getvalue(tup, desc, 1);
		char	   *workflow = get_text(tup, desc, 2);
		char	   *message = get_text(tup, desc, 5);
		TimestampTz started = DatumGetTimestampTz(SPI_getbinval(tup, desc, 6, &isnull));

		SPI_freetuptable(SPI_tuptable);
		memset(&e, 0, sizeof(e));
		e.sqlerrcode = ERRCODE_ORCH_PERMANENT;
		e.message = psprintf("child run %s of workflow \"%s\" %s%s%s", child_id, workflow,
							 status, message ? ": " : "", message ? message : "");
		record_attempt(s, s->attempt, worker, started, GetCurrentTimestamp(), &e, "permanent");
		handle_failure(s, s->attempt, started, &e, "permanent", now, result);
	}
	else
	{
		/* woken while the child still runs */
		SPI_freetuptable(SPI_tuptable);
		defer_step(s, "waiting", now + CHILD_RECHECK_USECS, s->attempt, (Datum) 0);
	}
}

/*
 * A map step runs its workflow once per item, as child runs
 * (orch._advance_map starts them, max_concurrency at a time); each child's
 * end wakes it.  It succeeds with the results in item order once all have
 * ended, or fails once more items failed than it tolerates; the retry
 * policy may then run the whole map again, with new children.
 */
static void
advance_map(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	bool		first = strcmp(s->status, "waiting") != 0;
	int			attempt = first ? s->attempt + 1 : s->attempt;
	Datum		v[3] = {Int64GetDatum(s->step_id), s->ctx, Int32GetDatum(attempt)};
	Datum		decision;
	char	   *action;

	if (strcmp(s->status, "ready") == 0 && maybe_skip(s, worker, now, result))
		return;
	/* what this batch did to the children so far is written before they are counted */
	flush_all(now, result);
	decision = decision_of(P_MAP, v);
	action = jsonb_field_text(decision, "action");
	if (strcmp(action, "succeed") == 0)
	{
		JsonbValue *jv = getKeyJsonValueFromContainer(&DatumGetJsonbP(decision)->root, "output",
													  6, NULL);

		record_attempt(s, attempt, worker, s->started_at != 0 ? s->started_at : now,
					   GetCurrentTimestamp(), NULL, NULL);
		finish_step(s, "succeeded", JsonbPGetDatum(JsonbValueToJsonb(jv)), attempt);
	}
	else if (strcmp(action, "fail") == 0)
	{
		ErrorData	e;

		JsonbValue *cancelled = getKeyJsonValueFromContainer(&DatumGetJsonbP(decision)->root,
															 "cancelled", 9, NULL);

		/* the children it cancelled: no step of theirs is advanced in this batch */
		if (cancelled != NULL && cancelled->type == jbvBinary)
		{
			MemoryContext oldcxt = MemoryContextSwitchTo(batch_cxt);
			int			n = JsonContainerSize(cancelled->val.binary.data);

			for (int i = 0; i < n; i++)
			{
				JsonbValue *id = getIthJsonbValueFromContainer(cancelled->val.binary.data, i);
				char	   *txt = pnstrdup(id->val.string.val, id->val.string.len);

				failed_runs = lappend(failed_runs,
									  DatumGetUUIDP(DirectFunctionCall1(uuid_in, CStringGetDatum(txt))));
			}
			MemoryContextSwitchTo(oldcxt);
		}
		memset(&e, 0, sizeof(e));
		e.sqlerrcode = ERRCODE_ORCH_PERMANENT;
		e.message = jsonb_field_text(decision, "message");
		record_attempt(s, attempt, worker, s->started_at != 0 ? s->started_at : now,
					   GetCurrentTimestamp(), &e, "permanent");
		handle_failure(s, attempt, now, &e, "permanent", now, result);
	}
	else
	{
		defer_step(s, "waiting", now + CHILD_RECHECK_USECS, attempt, (Datum) 0);
		if (first)
			run_step_done(s, 0);
		result->made_ready = ready_elsewhere = true;	/* children may have been started */
	}
}

static bool
run_failed_in_batch(ClaimedStep *s)
{
	ListCell   *lc;

	foreach(lc, failed_runs)
	{
		if (memcmp(lfirst(lc), DatumGetUUIDP(s->run_id), UUID_LEN) == 0)
			return true;
	}
	return false;
}

static void
advance_step(ClaimedStep *s, const char *worker, TimestampTz now, OrchBatchResult *result)
{
	if (s->phase != NULL && strcmp(s->phase, "compensate") == 0)
	{
		/* its run has ended: compensations are all that is left of it */
		advance_compensation(s, worker, now, result);
		return;
	}
	if (run_failed_in_batch(s))
		return;					/* cancelled along with its failed run */
	if (strcmp(s->run_status, "paused") == 0)
	{
		/* park until resume_run */
		defer_step_phase(s, s->status, DT_NOEND, s->attempt, (Datum) 0, s->phase);
		return;
	}
	if (s->phase != NULL && strcmp(s->phase, "resolve") == 0)
		advance_resolution(s, now, result);
	else if (s->phase != NULL && strcmp(s->phase, "verify") == 0)
		advance_verify(s, worker, now, result);
	else if (strcmp(s->kind, "sql") == 0)
		advance_sql(s, worker, now, result);
	else if (strcmp(s->kind, "sleep") == 0)
		advance_sleep(s, worker, now, result);
	else if (strcmp(s->kind, "task") == 0)
		advance_task(s, worker, now, result);
	else if (strcmp(s->kind, "wait_event") == 0)
		advance_wait_event(s, worker, now, result);
	else if (strcmp(s->kind, "approval") == 0)
		advance_approval(s, worker, now, result);
	else if (strcmp(s->kind, "subworkflow") == 0)
		advance_subworkflow(s, worker, now, result);
	else if (strcmp(s->kind, "map") == 0)
		advance_map(s, worker, now, result);
	else
		elog(ERROR, "unknown step kind \"%s\"", s->kind);
}

/* The batch-scoped state, for one batch or one task verdict. */
static MemoryContext
batch_begin(void)
{
	if (batch_cxt != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("orchestrator functions cannot be called from inside a step")));
	batch_cxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator batch",
									  ALLOCSET_DEFAULT_SIZES);
	rows_cxt = AllocSetContextCreate(batch_cxt, "orchestrator rows", ALLOCSET_DEFAULT_SIZES);
	run_rows_cxt = AllocSetContextCreate(batch_cxt, "orchestrator run rows",
										 ALLOCSET_DEFAULT_SIZES);
	failed_runs = NIL;
	opened_circuits = NIL;
	batch_min_timer = 0;
	orch_last_step_id = 0;
	followers = NULL;
	nfollowers = maxfollowers = follow_total = 0;
	ready_elsewhere = false;
	buffers_empty(true);
	return batch_cxt;
}

/* On error too; the context itself goes with its parent's memory then. */
static void
batch_end(void)
{
	batch_cxt = NULL;
	rows_cxt = NULL;
	run_rows_cxt = NULL;
	failed_runs = NIL;
	opened_circuits = NIL;
	followers = NULL;
	nfollowers = maxfollowers = 0;
	buffers_empty(true);
}

/*
 * Claiming resumes after the last step the previous claim took while there
 * is a backlog.  Due steps are claimed in (wake_at, step_id) order, and
 * each claim changes the rows it takes, leaving their old index entries
 * behind until no snapshot can see them.  A claim that started from the
 * low end every time would step over all of them again, and while a long
 * transaction anywhere holds back the xmin horizon (another engine's batch
 * will do) that costs each claim as much as the whole backlog so far.  A
 * claim that comes back short, and one claim a second, start from the low
 * end again: steps that became due behind the resume point (a transaction
 * that committed late with an early now()) are not left waiting.
 */
static bool claim_resume = false;
static TimestampTz claim_after_at;
static int64 claim_after_id;
static TimestampTz last_full_claim = 0;

/* claim rounds a batch tries after one that found only finished steps */
#define STALE_CLAIM_ROUNDS	3

/* A batch was rolled back: the steps it claimed are due again, behind the resume point. */
void
orch_forget_claim_position(void)
{
	claim_resume = false;
}

static bool
is_due_status(const char *status)
{
	return strcmp(status, "ready") == 0 || strcmp(status, "waiting") == 0 ||
		strcmp(status, "retrying") == 0 || strcmp(status, "running") == 0 ||
		strcmp(status, "blocked") == 0 || strcmp(status, "needs_approval") == 0;
}

/*
 * Keep of the n steps a claim locked those still due (status and wake_at,
 * against the transaction's start), in order; returns how many.
 */
static int
keep_due(ClaimedStep *steps, int n)
{
	TimestampTz xact_now = GetCurrentTransactionStartTimestamp();
	int			kept = 0;

	for (int i = 0; i < n; i++)
	{
		if (is_due_status(steps[i].status) && steps[i].wake_at != 0 &&
			steps[i].wake_at <= xact_now)
			steps[kept++] = steps[i];
	}
	return kept;
}

/*
 * Claim up to max due steps into *steps; returns how many.  *stale is set
 * to how many of the rows it locked were no longer due: steps another
 * worker took and finished after the candidates were picked, which count
 * against max and are dropped.
 */
static int
claim_steps(int max, TimestampTz now, ClaimedStep **steps, int *stale)
{
	Datum		args[3];
	Datum		candidates;
	bool		isnull;
	int			n;
	int			kept;

	/* room to pass over the steps other workers have locked */
	args[0] = Int32GetDatum(max * Max(orch_workers_per_database, 1) + max);
	if (claim_resume && now - last_full_claim < USECS_PER_SEC)
	{
		args[1] = TimestampTzGetDatum(claim_after_at);
		args[2] = Int64GetDatum(claim_after_id);
		exec_plan(P_CANDIDATES_AFTER, args, NULL, SPI_OK_SELECT);
	}
	else
	{
		last_full_claim = now;
		exec_plan(P_CANDIDATES, args, NULL, SPI_OK_SELECT);
	}
	candidates = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	*stale = 0;
	if (isnull)
	{
		SPI_freetuptable(SPI_tuptable);
		claim_resume = false;
		*steps = NULL;
		return 0;
	}
	args[0] = datumCopy(candidates, false, -1);
	args[1] = Int32GetDatum(max);
	SPI_freetuptable(SPI_tuptable);
	n = fetch_steps(P_CLAIM, args, batch_cxt, steps);

	/* only the engine worker resumes: orch.tick() claims as it is told */
	claim_resume = n == max && IsBackgroundWorker;
	if (n > 0)
	{
		claim_after_at = (*steps)[n - 1].wake_at;
		claim_after_id = (*steps)[n - 1].step_id;
	}

	/* drop what changed since the candidates were picked */
	kept = keep_due(*steps, n);
	*stale = n - kept;
	return kept;
}

/*
 * Claim up to max of the batch's followers (the steps its writes made
 * ready) into *steps; returns how many.  They are ready, and the batch
 * holds their rows' locks already; one whose run another worker has locked
 * is left for a later claim.
 */
static int
claim_followers(int max, ClaimedStep **steps)
{
	int			dims[1] = {nfollowers};
	int			lbs[1] = {1};
	Datum		args[2];

	args[0] = PointerGetDatum(construct_md_array(followers, NULL, 1, dims, lbs, INT8OID,
												 sizeof(int64), FLOAT8PASSBYVAL,
												 TYPALIGN_DOUBLE));
	args[1] = Int32GetDatum(max);
	nfollowers = 0;
	return keep_due(*steps, fetch_steps(P_CLAIM, args, batch_cxt, steps));
}

/*
 * How many due steps the engine's batch claims in its first round: room is
 * left for the steps they will make ready, follow_ratio of them a step as
 * the last batch that filled its first round measured (chain3: two), at
 * most MAX_FOLLOW_RATIO: the first round takes at least a quarter of the
 * batch, so that each round's set-wise writes still serve many steps (the
 * runs of a long chain would otherwise be followed one at a time, a round
 * for each step).  orch.tick() claims as it is told.
 */
#define MAX_FOLLOW_RATIO	3.0
static double follow_ratio = 0;

static int
first_round_size(int max_steps)
{
	if (!IsBackgroundWorker)
		return max_steps;
	return Max((int) (max_steps / (1 + follow_ratio)), 1);
}

/*
 * One batch: claim up to max_steps due steps and advance each.  Runs inside
 * the caller's transaction and SPI connection.
 */
void
orch_process_batch(int max_steps, const char *worker, OrchBatchResult *result)
{
	MemoryContext cxt;
	MemoryContext step_cxt;
	MemoryContext oldcxt;
	TimestampTz now = GetCurrentTimestamp();
	int			stale_rounds = 0;
	int			first_want = 0;
	int			first_claimed = -1;
	bool		more_due = false;

	cxt = batch_begin();
	step_cxt = AllocSetContextCreate(cxt, "orchestrator step", ALLOCSET_DEFAULT_SIZES);

	PG_TRY();
	{
		/* runs past their deadline first: their steps must not run */
		exec_plan(P_DEADLINES, NULL, NULL, SPI_OK_UPDATE_RETURNING);
		if (SPI_processed > 0)
		{
			uint64		ntimed = SPI_processed;
			Datum	   *timed_out = palloc(sizeof(Datum) * ntimed);
			bool		isnull;

			for (uint64 i = 0; i < ntimed; i++)
				timed_out[i] = get_copy(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
			SPI_freetuptable(SPI_tuptable);
			result->runs_finished += ntimed;
			result->claimed += ntimed;
			for (uint64 i = 0; i < ntimed; i++)
				(void) compensate_next(timed_out[i], result);
		}

		/*
		 * Claim rounds.  The first takes due steps in order, leaving room
		 * for the steps they will make ready (first_round_size); each later
		 * round takes those first (claim_followers).  Then, while the batch
		 * has room, more in order: when steps were made ready some other
		 * way, or when the last claim in order came back full and none
		 * followed (the room left for them would stay empty; when some
		 * did, the steps taken now would leave theirs to a later batch).
		 * A round that took nothing but steps another worker finished
		 * meanwhile (it picked them before that worker committed) is
		 * followed by another, which picks after them, a few times: a batch
		 * that came back empty would make this worker sleep while due steps
		 * wait.
		 */
		while (result->claimed < max_steps)
		{
			ClaimedStep *steps;
			int			n;
			int			stale = 0;
			int			want = max_steps - result->claimed;

			if (nfollowers > 0)
				n = claim_followers(want, &steps);
			else
			{
				if (first_want == 0)
					want = first_want = first_round_size(max_steps);
				ready_elsewhere = false;
				n = claim_steps(want, now, &steps, &stale);
				if (n == 0 && stale > 0 && stale_rounds++ < STALE_CLAIM_ROUNDS)
					continue;
				if (first_claimed < 0)
					first_claimed = n + stale;
				more_due = n > 0 && n + stale == want;
			}
			result->claimed += n;
			for (int i = 0; i < n; i++)
			{
				CHECK_FOR_INTERRUPTS();
				orch_last_step_id = steps[i].step_id;
				oldcxt = MemoryContextSwitchTo(step_cxt);
				advance_step(&steps[i], worker, now, result);
				MemoryContextSwitchTo(oldcxt);
				MemoryContextReset(step_cxt);
			}
			flush_buffers(now, result, false);
			if (nfollowers == 0 && !ready_elsewhere && !(more_due && follow_total == 0))
				break;
		}
		flush_all(now, result);

		/* a first round that filled measures how many steps follow one */
		if (first_claimed > 0 && first_claimed == first_want)
			follow_ratio = Min((double) follow_total / first_claimed, MAX_FOLLOW_RATIO);
	}
	PG_FINALLY();
	{
		batch_end();
	}
	PG_END_TRY();
	MemoryContextDelete(cxt);

	if (result->made_ready)
		orch_wake_engines_at_end();
}

/* Why a task's lease no longer admits a verdict, or NULL if it does. */
static char *
lease_invalid(ClaimedStep *s, TimestampTz now)
{
	if (strcmp(s->status, "running") != 0)
		return psprintf("Task \"%s\" is %s.", s->name, s->status);
	if (s->wake_at <= now)
		return psprintf("The lease on task \"%s\" has expired.", s->name);
	return NULL;
}

/* The worker holding the task's lease reports success. */
static void
task_succeeded(ClaimedStep *s, Datum output, TimestampTz now, OrchBatchResult *result)
{
	char	   *bad = schema_violation(s, s->output_schema, output, "output");

	if (bad != NULL)
	{
		/* the worker's answer is recorded, as the failed attempt it is */
		fail_validation(s, s->attempt, s->worker, s->attempt_started_at, bad, now, result);
		ereport(WARNING,
				(errcode(ERRCODE_ORCH_INVALID),
				 errmsg("%s", bad),
				 errdetail("The task's attempt %d failed for good, and will not be retried.",
						   s->attempt)));
		return;
	}
	record_attempt(s, s->attempt, s->worker, s->attempt_started_at, now, NULL, NULL);
	circuit_record(s, NULL);
	step_produced(s, output, s->attempt, now, result);
}

/*
 * After verdicts: the engine is needed only if steps became ready or timers
 * were set; runs may have finished.
 */
static void
wake_after_verdicts(OrchBatchResult *result)
{
	if (result->made_ready || result->tasks_queued > 0)
		orch_wake_engines_at_end();
	else if (batch_min_timer != 0)
		orch_wake_engines_for_timer_at_end(batch_min_timer);
	orch_broadcast_runs_at_end();
}

/*
 * A worker's verdict on the task it holds the lease token of: output on
 * success, else the error and its class.  The lease must still be valid: a
 * token from an expired lease, or of a task claimed again since, changes
 * nothing (fencing).
 */
void
orch_finish_task(Datum token, Datum output, const char *error, const char *error_class,
				 const char *detail)
{
	MemoryContext cxt;
	OrchBatchResult result;
	TimestampTz now = GetCurrentTimestamp();

	/* it locks its task's rows (as the executor refuses FOR UPDATE), whatever the token */
	PreventCommandIfReadOnly("SELECT FOR UPDATE");
	memset(&result, 0, sizeof(result));
	cxt = batch_begin();
	PG_TRY();
	{
		ClaimedStep task;
		ClaimedStep *s;
		char	   *invalid;

		s = fetch_task_by_token(token, cxt, &task) ? &task : NULL;
		invalid = s != NULL ? lease_invalid(s, now) : NULL;
		if (s == NULL || invalid != NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("task lease is not valid"),
					 s == NULL ?
					 errdetail("No task holds lease %s: it expired and the task went on, or the token is wrong.",
							   DatumGetCString(DirectFunctionCall1(uuid_out, token))) :
					 errdetail("%s", invalid),
					 s != NULL && strcmp(s->status, "cancelled") == 0 ?
					 errhint("Nothing was changed: the task's run ended without it.") :
					 errhint("Nothing was changed.  Claim the task again with orch.claim_tasks.")));

		if (error == NULL)
			task_succeeded(s, output, now, &result);
		else
		{
			ErrorData	e;

			memset(&e, 0, sizeof(e));
			e.sqlerrcode = strcmp(error_class, "transient") == 0 ? ERRCODE_ORCH_TRANSIENT :
				strcmp(error_class, "permanent") == 0 ? ERRCODE_ORCH_PERMANENT :
				ERRCODE_ORCH_UNKNOWN_OUTCOME;
			e.message = (char *) error;
			e.detail = (char *) detail;
			record_attempt(s, s->attempt, s->worker, s->attempt_started_at, now, &e, error_class);
			circuit_record(s, error_class);
			handle_failure(s, s->attempt, s->attempt_started_at, &e, error_class, now, &result);
		}
		flush_all(now, &result);
	}
	PG_FINALLY();
	{
		batch_end();
	}
	PG_END_TRY();
	MemoryContextDelete(cxt);
	wake_after_verdicts(&result);
}

/* A token of a batch of verdicts, and where it first came in the batch. */
typedef struct TokenPos
{
	Datum		token;
	int			pos;
} TokenPos;

/* By token, then by position: the first mention of a token comes first. */
static int
token_pos_cmp(const void *a, const void *b)
{
	const TokenPos *x = a;
	const TokenPos *y = b;
	int			c = memcmp(DatumGetUUIDP(x->token), DatumGetUUIDP(y->token), UUID_LEN);

	return c != 0 ? c : (x->pos > y->pos) - (x->pos < y->pos);
}

/* By token alone, to find a token among the distinct ones. */
static int
token_cmp(const void *a, const void *b)
{
	return memcmp(DatumGetUUIDP(((const TokenPos *) a)->token),
				  DatumGetUUIDP(((const TokenPos *) b)->token), UUID_LEN);
}

/*
 * Successful verdicts on n tasks at once: outputs[i] is the output of the
 * task leased with tokens[i].  A token whose lease is not valid changes
 * nothing and is reported (accepted[i] false, with why[i], allocated in the
 * caller's memory context); the others complete together, with one write of
 * each kind for all of them.
 */
void
orch_complete_tasks(int n, Datum *tokens, Datum *outputs,
					bool *accepted, char **why, MemoryContext callercxt)
{
	MemoryContext cxt;
	OrchBatchResult result;
	TimestampTz now = GetCurrentTimestamp();

	for (int i = 0; i < n; i++)
	{
		accepted[i] = false;
		why[i] = "No task holds this lease: it expired and the task went on, or the token is wrong.";
	}
	PreventCommandIfReadOnly("SELECT FOR UPDATE");
	memset(&result, 0, sizeof(result));
	cxt = batch_begin();
	PG_TRY();
	{
		ClaimedStep *steps;
		int			nfound;
		TokenPos   *all = palloc(sizeof(TokenPos) * n);
		TokenPos   *first = palloc(sizeof(TokenPos) * n);	/* distinct tokens */
		Datum	   *distinct = palloc(sizeof(Datum) * n);
		int			ndistinct = 0;

		for (int i = 0; i < n; i++)
		{
			all[i].token = tokens[i];
			all[i].pos = i;
		}
		qsort(all, n, sizeof(TokenPos), token_pos_cmp);
		for (int i = 0; i < n; i++)
		{
			if (ndistinct > 0 && token_cmp(&first[ndistinct - 1], &all[i]) == 0)
				continue;
			first[ndistinct] = all[i];
			distinct[ndistinct++] = all[i].token;
		}

		/* runs in run_id order, then tasks in token order: no deadlock between two batches */
		nfound = fetch_tasks_by_tokens(distinct, ndistinct, cxt, &steps);

		for (int k = 0; k < nfound; k++)
		{
			ClaimedStep *s = &steps[k];
			TokenPos	key = {s->lease_token, 0};
			TokenPos   *found = bsearch(&key, first, ndistinct, sizeof(TokenPos), token_cmp);
			char	   *invalid;

			if (found == NULL)
				continue;
			/* the first mention of the token is answered */
			invalid = run_failed_in_batch(s) ?
				"Its run failed earlier in this call: the task was cancelled with it." :
				lease_invalid(s, now);
			if (invalid != NULL)
			{
				why[found->pos] = MemoryContextStrdup(callercxt, invalid);
				continue;
			}
			accepted[found->pos] = true;
			why[found->pos] = NULL;
			task_succeeded(s, outputs[found->pos], now, &result);
		}

		/* a repetition of a token that was accepted is refused */
		for (int i = 1, g = 0; i < n; i++)
		{
			if (token_cmp(&all[g], &all[i]) != 0)
				g = i;			/* the first mention of the next token */
			else if (accepted[all[g].pos])
				why[all[i].pos] = "The same token came earlier in this call.";
		}
		flush_all(now, &result);
	}
	PG_FINALLY();
	{
		batch_end();
	}
	PG_END_TRY();
	MemoryContextDelete(cxt);
	wake_after_verdicts(&result);
}

/*
 * When the earliest step comes due, or DT_NOEND.  After a batch that claimed
 * nothing, a time already past means due steps were skipped as locked.
 */
TimestampTz
orch_next_timer(void)
{
	bool		isnull;
	Datum		d;

	exec_plan(P_NEXT_TIMER, NULL, NULL, SPI_OK_SELECT);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? DT_NOEND : DatumGetTimestampTz(d);
}

/*
 * A batch of one step failed outside the step's own code (an engine bug, a
 * trigger on the orchestrator's tables, a corrupt row): set the step aside
 * for a human, with the error, so that it cannot stop every other run of
 * the database.  Runs in a transaction of its own.
 */
void
orch_quarantine_step(int64 step_id, ErrorData *edata)
{
	Datum		args[2];
	StringInfoData buf;
	bool		first = true;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	json_add_field(&buf, "class", "internal", &first);
	json_add_field(&buf, "sqlstate", unpack_sql_state(edata->sqlerrcode), &first);
	json_add_field(&buf, "message", edata->message, &first);
	json_add_field(&buf, "detail", edata->detail, &first);
	json_add_field(&buf, "hint", edata->hint, &first);
	json_add_field(&buf, "context", edata->context, &first);
	json_add_field(&buf, "gave_up", "the engine failed while advancing the step", &first);
	appendStringInfoChar(&buf, '}');

	args[0] = Int64GetDatum(step_id);
	args[1] = jsonb_from_cstring(buf.data);
	if (SPI_execute_with_args(
			"WITH s AS ("
			"  UPDATE orch.steps SET status = 'needs_human', wake_at = NULL,"
			"         error = $2 OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('step', name)"
			"   WHERE step_id = $1"
			"     AND status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled', 'compensated')"
			"  RETURNING run_id)"
			"UPDATE orch.runs r SET status = 'needs_human'"
			"  FROM s WHERE r.run_id = s.run_id"
			"   AND " ORCH_RUN_STATUS_IN("r", "'pending', 'running', 'needs_approval'"),
			2, (Oid[]) {INT8OID, JSONBOID}, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "could not set step " INT64_FORMAT " aside", step_id);
}
