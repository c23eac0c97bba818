/*-------------------------------------------------------------------------
 * api_tasks.c
 *	  External task workers: orch.claim_tasks, orch.complete_task and
 *	  orch.fail_task.  A claim gives a lease with a token; the token fences
 *	  the verdict, which goes through the engine's own state machine
 *	  (steps.c), so a task's completion commits with the readiness of the
 *	  steps after it.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "orchestrator.h"

/*
 * A queue with a limit is locked while claiming from it, so that concurrent
 * claims cannot together exceed it; a queue without one is not.  The lock is
 * taken by a statement of its own: the statement after it then counts the
 * leased tasks with a snapshot that includes the claims it waited for.
 * Whether a queue has a limit is read first, without a plan (queue_limited).
 */
#define LOCK_QUEUE_SQL \
	"SELECT 1 FROM orch.queues WHERE name = $1 AND max_running IS NOT NULL FOR UPDATE"

/* how many tasks of queue $1 are leased */
#define QUEUE_RUNNING_SQL \
	"(SELECT pg_catalog.count(*) FROM orch.steps x WHERE x.queue = $1 AND x.status = 'running')"

/* The room left under a limited queue's limit.  No row: no limit. */
#define QUEUE_FREE_SQL \
	"SELECT GREATEST(q.max_running - " QUEUE_RUNNING_SQL ", 0)" \
	"  FROM orch.queues q WHERE q.name = $1 AND q.max_running IS NOT NULL"

/*
 * Could a claim from this limited queue get anything now: is there room, and
 * a task a claim would take (of a pending or running run)?  No row: no limit.
 */
#define QUEUE_ROOM_SQL \
	"SELECT q.max_running > " QUEUE_RUNNING_SQL \
	"   AND EXISTS (SELECT FROM orch.steps w JOIN orch.runs r ON r.run_id = w.run_id" \
	"                WHERE w.queue = $1 AND w.status = 'waiting'" \
	"                  AND " ORCH_RUN_STATUS_IN("r", "'pending', 'running'") ")" \
	"  FROM orch.queues q WHERE q.name = $1 AND q.max_running IS NOT NULL"

/*
 * Lease the tasks orch_pick_tasks locked (steps $1) to worker $2 for $3,
 * capped by each step's timeout and heartbeat_timeout, returning what the
 * worker is handed (the context is built from the other columns).  The
 * rows come in step order: claim_into puts them back in claim order.
 * Used only where orch.steps needs the executor (a trigger of its own,
 * see rowwrite.c); lease_directly does the same without it.
 */
#define CLAIM_TASKS_SQL \
	"UPDATE orch.steps s" \
	"   SET status = 'running', attempt = s.attempt + 1," \
	"       lease_token = orch._lease_token(s.step_id), worker = $2," \
	"       lease = LEAST($3, ws.timeout, ws.heartbeat_timeout)," \
	"       attempt_started_at = pg_catalog.clock_timestamp()," \
	"       started_at = COALESCE(s.started_at, pg_catalog.clock_timestamp())," \
	"       wake_at = pg_catalog.clock_timestamp() + LEAST($3, ws.timeout, ws.heartbeat_timeout)" \
	"  FROM orch.runs r, orch.workflow_steps ws" \
	" WHERE s.step_id = ANY ($1)" \
	"   AND r.run_id = s.run_id" \
	"   AND ws.workflow = r.workflow AND ws.version = r.version AND ws.name = s.name" \
	" RETURNING s.lease_token, s.run_id, s.name, NULL::pg_catalog.jsonb," \
	"       s.attempt, s.run_id::text || '/' || s.name," \
	"       '00-' || pg_catalog.encode(r.trace_id, 'hex') || '-'" \
	"         || pg_catalog.lpad(pg_catalog.to_hex(s.step_id), 16, '0') || '-01'," \
	"       s.wake_at, s.priority, s.step_id," \
	"       r.workflow, r.version, r.input, r.business_key," \
	"       " ORCH_STEP_OUTPUTS_SQL("s.run_id") "," \
	"       s.cause"

/* The statements above, prepared once per session. */
enum
{
	T_LOCK_QUEUE,
	T_QUEUE_FREE,
	T_QUEUE_ROOM,
	T_CLAIM,
	T_COUNT
};
static SPIPlanPtr task_plans[T_COUNT];
static const char *const task_sql[T_COUNT] = {
	[T_LOCK_QUEUE] = LOCK_QUEUE_SQL,
	[T_QUEUE_FREE] = QUEUE_FREE_SQL,
	[T_QUEUE_ROOM] = QUEUE_ROOM_SQL,
	[T_CLAIM] = CLAIM_TASKS_SQL,
};

static SPIPlanPtr
task_plan(int which)
{
	static Oid	queue_arg[1] = {TEXTOID};
	static Oid	claim_args[3] = {INT8ARRAYOID, TEXTOID, INTERVALOID};

	if (task_plans[which] == NULL)
	{
		/* generic plans, as the engine's (steps.c) */
		SPIPlanPtr	plan = which == T_CLAIM ?
			SPI_prepare_cursor(task_sql[which], 3, claim_args, CURSOR_OPT_GENERIC_PLAN) :
			SPI_prepare_cursor(task_sql[which], 1, queue_arg, CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "SPI_keepplan failed");
		task_plans[which] = plan;
	}
	return task_plans[which];
}

/* how soon a waiting claim that found the queue's tasks locked looks again */
#define LOCKED_OUT_RETRY_MS		10

/*
 * While a queue has a backlog, claims resume after the last task claimed
 * from it, in the queue's order, by any session of the database.  Claimed
 * tasks leave their entries at the head of the queue's index until vacuum
 * removes them; a claim that started from the head every time would step
 * over all of them (tens of index pages per claim after a few thousand
 * tasks, read by every client at once), and one that resumed where its own
 * session left off would step over the tasks every other session took
 * since (hundreds of rows per claim with 32 clients claiming 10 each).
 *
 * A claim starts from the head when the last one from there is older than
 * CLAIM_HEAD_MS, or when a resumed claim came back short.  A claim from the
 * head that comes back full sets the resume point to its last task, behind
 * the old one if it found tasks there (a retry, a run of higher priority,
 * tasks a claim that aborted had locked), and starts a new generation: the
 * claims still running from the old point do not move it forward again, so
 * the claims after it work through those tasks first.  A task that became
 * claimable behind the resume point waits at most CLAIM_HEAD_MS, plus the
 * time the claims take to reach it, while the backlog lasts.
 */
#define CLAIM_HEAD_MS			100

/* slots looked at for a queue, from the one its hash names */
#define FRONTIER_PROBES			4

/* where claims resume without the shared state (not preloaded) */
static OrchClaimFrontier local_frontier;

/* A queue's name and the hash that places its frontier, taken once a claim */
typedef struct FrontierKey
{
	const char *queue;
	uint32		hash;
	bool		usable;			/* the name fits a frontier's slot */
} FrontierKey;

static FrontierKey
frontier_key(const char *queue)
{
	FrontierKey k = {queue, 0, strlen(queue) < NAMEDATALEN};

	if (k.usable)
		k.hash = hash_combine(hash_bytes_uint32((uint32) MyDatabaseId),
							  hash_bytes((const unsigned char *) queue, (int) strlen(queue)));
	return k;
}

/*
 * The frontier of (this database, k's queue): its slot among the
 * FRONTIER_PROBES from the one its hash names, else a free one, else the
 * one a claim looked at least recently, taken over.  Called with the
 * frontiers' lock held.
 */
static OrchClaimFrontier *
frontier_of(const FrontierKey *k)
{
	const char *queue = k->queue;
	OrchClaimFrontier *f = NULL;

	if (OrchShared == NULL)
		f = &local_frontier;
	else
	{
		OrchClaimFrontier *stalest = NULL;

		for (int i = 0; i < FRONTIER_PROBES && f == NULL; i++)
		{
			OrchClaimFrontier *c = &OrchShared->frontiers[(k->hash + i) % ORCH_CLAIM_FRONTIERS];

			if (c->dboid == MyDatabaseId && strcmp(c->queue, queue) == 0)
				f = c;
			else if (stalest == NULL || c->dboid == InvalidOid ||
					 (stalest->dboid != InvalidOid && c->head_at < stalest->head_at))
				stalest = c;
		}
		if (f == NULL)
			f = stalest;
	}
	if (f->dboid != MyDatabaseId || strcmp(f->queue, queue) != 0)
	{
		memset(f, 0, sizeof(*f));
		f->dboid = MyDatabaseId;
		strlcpy(f->queue, queue, NAMEDATALEN);
	}
	return f;
}

static inline void
frontier_lock(void)
{
	if (OrchShared != NULL)
		SpinLockAcquire(&OrchShared->frontiers_lock);
}

static inline void
frontier_unlock(void)
{
	if (OrchShared != NULL)
		SpinLockRelease(&OrchShared->frontiers_lock);
}

/*
 * Should a claim from the queue resume, and after which key?  *generation
 * is the resume point's, for frontier_note.
 */
static bool
frontier_get(const FrontierKey *k, int64 *neg_priority, int64 *step_id, uint64 *generation)
{
	TimestampTz now = GetCurrentTimestamp();
	OrchClaimFrontier *f;
	bool		resume;

	if (!k->usable)
		return false;
	frontier_lock();
	f = frontier_of(k);
	resume = f->valid && now - f->head_at < CLAIM_HEAD_MS * INT64CONST(1000);
	*neg_priority = f->neg_priority;
	*step_id = f->step_id;
	*generation = f->generation;
	frontier_unlock();
	return resume;
}

/*
 * After a claim that locked the n tasks, from the head or resumed from the
 * point of generation `generation`.
 */
static void
frontier_note(const FrontierKey *k, const OrchPickedTask *tasks, int n, bool full, bool from_head,
			  uint64 generation)
{
	int64		neg_priority = n > 0 ? tasks[n - 1].neg_priority : 0;
	int64		step_id = n > 0 ? tasks[n - 1].step_id : 0;
	TimestampTz now = GetCurrentTimestamp();
	OrchClaimFrontier *f;

	if (!k->usable)
		return;
	frontier_lock();
	f = frontier_of(k);
	if (from_head)
	{
		/* a new resume point, wherever the old one was; or none */
		f->head_at = now;
		f->generation++;
		f->valid = full && n > 0;
		f->neg_priority = neg_priority;
		f->step_id = step_id;
	}
	else if (generation == f->generation)
	{
		if (!full || n == 0)
		{
			/* nothing left after the point: the next claim looks from the head */
			f->generation++;
			f->valid = false;
		}
		else if (neg_priority > f->neg_priority ||
				 (neg_priority == f->neg_priority && step_id > f->step_id))
		{
			f->neg_priority = neg_priority;
			f->step_id = step_id;
		}
	}
	frontier_unlock();
}

static int64
interval_to_usecs(const Interval *iv)
{
	return iv->time + (int64) iv->day * USECS_PER_DAY +
		(int64) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;
}

/* The checks of a claim's arguments. */
static void
check_claim_args(text *worker, int32 max, Interval *lease)
{
	int64		lease_us = interval_to_usecs(lease);

	if (max < 1 || max > 10000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max must be between 1 and 10000, not %d", max)));
	if (lease_us <= 0 || lease_us > USECS_PER_DAY * 7)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("lease must be positive and at most 7 days"),
				 errhint("Renew a long lease with orch.heartbeat_task instead.")));
	if (VARSIZE_ANY_EXHDR(worker) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("worker must name the worker"),
				 errhint("Attempts record it: use something an operator can find, such as host:pid.")));
}

/* the columns of a claim's rows (CLAIM_TASKS_SQL), from 1 */
enum
{
	CC_TOKEN = 1, CC_RUN_ID, CC_NAME, CC_CONTEXT, CC_ATTEMPT, CC_IDEMPOTENCY_KEY,
	CC_TRACEPARENT, CC_WAKE_AT, CC_PRIORITY, CC_STEP_ID, CC_WORKFLOW, CC_VERSION,
	CC_INPUT, CC_BUSINESS_KEY, CC_STEPS, CC_CAUSE, CC_NCOLS = CC_CAUSE
};

static void
push_key(JsonbParseState **ps, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = strlen(key);
	(void) pushJsonbValue(ps, WJB_KEY, &k);
}

static void
push_string(JsonbParseState **ps, const char *key, char *str)
{
	JsonbValue	v;

	push_key(ps, key);
	v.type = jbvString;
	v.val.string.val = str;
	v.val.string.len = strlen(str);
	(void) pushJsonbValue(ps, WJB_VALUE, &v);
}

static void
push_int(JsonbParseState **ps, const char *key, int32 i)
{
	JsonbValue	v;

	push_key(ps, key);
	v.type = jbvNumeric;
	v.val.numeric = int64_to_numeric(i);
	(void) pushJsonbValue(ps, WJB_VALUE, &v);
}

/*
 * The run context a claimed task's worker is handed: the document
 * jsonb_build_object('run_id', ..., 'workflow', ..., 'version', ..., 'step',
 * ..., 'attempt', ..., 'input', ..., 'business_key', ..., 'steps', ...),
 * with 'error' too when the run was routed to the step by an error.  Built
 * here: jsonb_build_object looks up how to convert each argument's type at
 * every call, about 40,000 instructions per claimed task.
 */
static Datum
task_context(const Datum *v, const bool *nulls)
{
	JsonbParseState *ps = NULL;
	JsonbValue *res;

	(void) pushJsonbValue(&ps, WJB_BEGIN_OBJECT, NULL);
	push_string(&ps, "run_id", DatumGetCString(DirectFunctionCall1(uuid_out, v[CC_RUN_ID - 1])));
	push_string(&ps, "workflow", TextDatumGetCString(v[CC_WORKFLOW - 1]));
	push_int(&ps, "version", DatumGetInt32(v[CC_VERSION - 1]));
	push_string(&ps, "step", TextDatumGetCString(v[CC_NAME - 1]));
	push_int(&ps, "attempt", DatumGetInt32(v[CC_ATTEMPT - 1]));
	push_key(&ps, "input");
	orch_push_jsonb(&ps, DatumGetJsonbP(v[CC_INPUT - 1]));
	if (nulls[CC_BUSINESS_KEY - 1])
	{
		JsonbValue	null = {.type = jbvNull};

		push_key(&ps, "business_key");
		(void) pushJsonbValue(&ps, WJB_VALUE, &null);
	}
	else
		push_string(&ps, "business_key", TextDatumGetCString(v[CC_BUSINESS_KEY - 1]));
	push_key(&ps, "steps");
	orch_push_jsonb(&ps, DatumGetJsonbP(v[CC_STEPS - 1]));
	if (!nulls[CC_CAUSE - 1])
	{
		push_key(&ps, "error");
		orch_push_jsonb(&ps, DatumGetJsonbP(v[CC_CAUSE - 1]));
	}
	res = pushJsonbValue(&ps, WJB_END_OBJECT, NULL);
	return JsonbPGetDatum(JsonbValueToJsonb(res));
}

/* orch.queues' max_running, by the queue's name */
static OrchRowSource queue_source = {
	"queues", "queues_pkey", 1, 1, {"max_running"}
};

/*
 * Has the queue a limit (max_running)?  A queue that was never defined has
 * none.  Read before the claim, with a snapshot of its own: a limit set by a
 * transaction that commits in between applies from the next claim on (as it
 * does to claims running while it commits).
 */
static bool
queue_limited(text *queue)
{
	Datum		key = PointerGetDatum(queue);
	Datum		max_running;
	bool		isnull;

	return orch_row_fetch(&queue_source, &key, false, &max_running, &isnull) && !isnull;
}

/* a claimed task: its step, its place in claim order, its row of the claim's result */
typedef struct ClaimedRow
{
	int64		step_id;
	int			place;
	int64		row;			/* -1: none */
} ClaimedRow;

static int
claimed_step_cmp(const void *a, const void *b)
{
	const ClaimedRow *x = a;
	const ClaimedRow *y = b;

	return x->step_id < y->step_id ? -1 : x->step_id > y->step_id ? 1 : 0;
}

static int
claimed_place_cmp(const void *a, const void *b)
{
	const ClaimedRow *x = a;
	const ClaimedRow *y = b;

	return x->place - y->place;
}

/*
 * lease_picked by CLAIM_TASKS_SQL, for a table that needs the executor
 * (orch_writer_begin).
 */
static void
lease_picked_sql(ReturnSetInfo *rsinfo, const OrchPickedTask *picked, int n, text *worker,
				 Interval *lease)
{
	Datum	   *ids = palloc(sizeof(Datum) * n);
	ClaimedRow *order = palloc(sizeof(ClaimedRow) * n);
	Datum		args[3];
	SPITupleTable *rows;
	bool		woken = false;

	for (int i = 0; i < n; i++)
	{
		ids[i] = Int64GetDatum(picked[i].step_id);
		order[i].step_id = picked[i].step_id;
		order[i].place = i;
		order[i].row = -1;
	}
	args[0] = PointerGetDatum(construct_array(ids, n, INT8OID, sizeof(int64), FLOAT8PASSBYVAL,
											  TYPALIGN_DOUBLE));
	args[1] = PointerGetDatum(worker);
	args[2] = IntervalPGetDatum(lease);
	if (orch_execute_plan(task_plan(T_CLAIM), args, NULL, 0) != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "could not claim tasks");
	rows = SPI_tuptable;

	/*
	 * The rows in claim order.  A row comes back for every task locked: the
	 * tasks' runs were read with them, and a definition cannot go while it
	 * has runs.
	 */
	qsort(order, n, sizeof(ClaimedRow), claimed_step_cmp);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		ClaimedRow	key;
		ClaimedRow *found;

		key.step_id = DatumGetInt64(SPI_getbinval(rows->vals[i], rows->tupdesc, CC_STEP_ID, &isnull));
		found = bsearch(&key, order, n, sizeof(ClaimedRow), claimed_step_cmp);
		if (found == NULL)
			elog(ERROR, "claimed step " INT64_FORMAT " was not locked", key.step_id);
		found->row = (int64) i;
	}
	qsort(order, n, sizeof(ClaimedRow), claimed_place_cmp);

	for (int i = 0; i < n; i++)
	{
		HeapTuple	tuple;
		Datum		values[CC_NCOLS];
		bool		nulls[CC_NCOLS];

		if (order[i].row < 0)
			continue;
		tuple = rows->vals[order[i].row];
		/* the engine must also wake when these leases expire */
		if (!woken)
		{
			bool		isnull;

			/* rows come ordered by priority, not expiry: the first is close enough */
			orch_wake_engines_for_timer_at_end(
				DatumGetTimestampTz(SPI_getbinval(tuple, rows->tupdesc, CC_WAKE_AT, &isnull)));
			woken = true;
		}
		heap_deform_tuple(tuple, rows->tupdesc, values, nulls);
		values[CC_CONTEXT - 1] = task_context(values, nulls);
		nulls[CC_CONTEXT - 1] = false;
		/* the first eight columns are the task_lease */
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_freetuptable(rows);
}

/*
 * The columns of orch.steps a lease reads or writes (LS_*), of the run and
 * the definition it reads (LR_*, LD_*).
 */
enum
{
	LS_STEP_ID, LS_RUN_ID, LS_NAME, LS_STATUS, LS_ATTEMPT, LS_LEASE_TOKEN, LS_WORKER, LS_LEASE,
	LS_ATTEMPT_STARTED_AT, LS_STARTED_AT, LS_WAKE_AT, LS_PRIORITY, LS_CAUSE, LS_NCOLS
};
static OrchRowSource lease_step_source = {
	"steps", "steps_pkey", 1, LS_NCOLS,
	{"step_id", "run_id", "name", "status", "attempt", "lease_token", "worker", "lease",
	"attempt_started_at", "started_at", "wake_at", "priority", "cause"}
};
/* a lease writes the columns from LS_STATUS to LS_WAKE_AT */

enum
{
	LR_TRACE_ID, LR_WORKFLOW, LR_VERSION, LR_INPUT, LR_BUSINESS_KEY, LR_NCOLS
};
static OrchRowSource lease_run_source = {
	"runs", "runs_pkey", 1, LR_NCOLS, {"trace_id", "workflow", "version", "input", "business_key"}
};

enum
{
	LD_TIMEOUT, LD_HEARTBEAT_TIMEOUT, LD_NCOLS
};
static OrchRowSource lease_definition_source = {
	"workflow_steps", "workflow_steps_pkey", 3, LD_NCOLS, {"timeout", "heartbeat_timeout"}
};

/* The shorter of two intervals, either of them NULL (as LEAST ignores NULLs). */
static Interval *
shorter(Interval *a, Interval *b)
{
	if (a == NULL)
		return b;
	if (b == NULL)
		return a;
	return DatumGetInt32(DirectFunctionCall2(interval_cmp, IntervalPGetDatum(a),
											 IntervalPGetDatum(b))) <= 0 ? a : b;
}

/*
 * Lease the picked tasks through w (orch_writer_begin on orch.steps), as
 * CLAIM_TASKS_SQL would, into rows of the claim's result (CC_* columns),
 * in the order they were picked: rows[i] for picked[i].
 */
static void
lease_directly(OrchRowWriter *w, const OrchPickedTask *picked, int n, text *worker,
			   Interval *lease, TupleDesc result_desc, HeapTuple *rows, TimestampTz *first_wake)
{
	const int16 *att = orch_row_source_attnums(&lease_step_source);
	TupleDesc	desc = RelationGetDescr(w->rel);
	Datum	   *values = w->values;
	ClaimedRow *order = palloc(sizeof(ClaimedRow) * n);
	Oid			running = orch_enum_oid(TupleDescAttr(desc, att[LS_STATUS] - 1)->atttypid, "running");

	/* in step order, as the statement's index scan updates them */
	for (int i = 0; i < n; i++)
	{
		order[i].step_id = picked[i].step_id;
		order[i].place = i;
	}
	qsort(order, n, sizeof(ClaimedRow), claimed_step_cmp);
	for (int i = 0; i < n; i++)
	{
		int			place = order[i].place;
		TupleTableSlot *row = orch_writer_fetch(w, (ItemPointer) &picked[place].tid);
		Datum	   *v = row->tts_values;
		bool	   *isnull = row->tts_isnull;
		int64		step_id = DatumGetInt64(v[att[LS_STEP_ID] - 1]);
		Datum		run_id = v[att[LS_RUN_ID] - 1];
		Datum		name = v[att[LS_NAME] - 1];
		Datum		run[LR_NCOLS];
		bool		run_nulls[LR_NCOLS];
		Datum		definition[LD_NCOLS];
		bool		definition_nulls[LD_NCOLS];
		Datum		keys[3];
		Interval   *held;
		TimestampTz now;
		TimestampTz wake_at;
		Datum		cc[CC_NCOLS];
		bool		cc_nulls[CC_NCOLS];
		char	   *run_text;
		char	   *trace_hex;

		if (step_id != picked[place].step_id)
			elog(ERROR, "the row locked for step " INT64_FORMAT " is step " INT64_FORMAT,
				 picked[place].step_id, step_id);
		/* the task's run, read with it when it was picked, and its definition */
		if (!orch_row_fetch(&lease_run_source, &run_id, false, run, run_nulls))
			elog(ERROR, "the run of claimed step " INT64_FORMAT " is missing", step_id);
		keys[0] = run[LR_WORKFLOW];
		keys[1] = run[LR_VERSION];
		keys[2] = name;
		if (!orch_row_fetch(&lease_definition_source, keys, false, definition, definition_nulls))
			elog(ERROR, "the definition of claimed step " INT64_FORMAT " is missing", step_id);

		held = shorter(shorter(lease, definition_nulls[LD_TIMEOUT] ? NULL :
							   DatumGetIntervalP(definition[LD_TIMEOUT])),
					   definition_nulls[LD_HEARTBEAT_TIMEOUT] ? NULL :
					   DatumGetIntervalP(definition[LD_HEARTBEAT_TIMEOUT]));
		now = GetCurrentTimestamp();
		wake_at = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
														  TimestampTzGetDatum(now),
														  IntervalPGetDatum(held)));

		values[att[LS_STATUS] - 1] = ObjectIdGetDatum(running);
		values[att[LS_ATTEMPT] - 1] = Int32GetDatum(DatumGetInt32(v[att[LS_ATTEMPT] - 1]) + 1);
		values[att[LS_LEASE_TOKEN] - 1] = orch_lease_token_make(step_id);
		values[att[LS_WORKER] - 1] = PointerGetDatum(worker);
		values[att[LS_LEASE] - 1] = IntervalPGetDatum(held);
		values[att[LS_ATTEMPT_STARTED_AT] - 1] = TimestampTzGetDatum(now);
		values[att[LS_STARTED_AT] - 1] = isnull[att[LS_STARTED_AT] - 1] ?
			TimestampTzGetDatum(now) : v[att[LS_STARTED_AT] - 1];
		values[att[LS_WAKE_AT] - 1] = TimestampTzGetDatum(wake_at);

		/* what the claim returns: computed from the old row, before it goes */
		memset(cc_nulls, false, sizeof(cc_nulls));
		cc[CC_TOKEN - 1] = values[att[LS_LEASE_TOKEN] - 1];
		cc[CC_RUN_ID - 1] = datumCopy(run_id, false, UUID_LEN);
		cc[CC_NAME - 1] = PointerGetDatum(PG_DETOAST_DATUM_COPY(name));
		cc[CC_ATTEMPT - 1] = values[att[LS_ATTEMPT] - 1];
		run_text = DatumGetCString(DirectFunctionCall1(uuid_out, run_id));
		cc[CC_IDEMPOTENCY_KEY - 1] =
			CStringGetTextDatum(psprintf("%s/%s", run_text, TextDatumGetCString(name)));
		trace_hex = palloc(2 * VARSIZE_ANY_EXHDR(DatumGetPointer(run[LR_TRACE_ID])) + 1);
		trace_hex[hex_encode(VARDATA_ANY(DatumGetPointer(run[LR_TRACE_ID])),
							 VARSIZE_ANY_EXHDR(DatumGetPointer(run[LR_TRACE_ID])), trace_hex)] = '\0';
		cc[CC_TRACEPARENT - 1] =
			CStringGetTextDatum(psprintf("00-%s-%016" INT64_MODIFIER "x-01", trace_hex, step_id));
		cc[CC_WAKE_AT - 1] = TimestampTzGetDatum(wake_at);
		cc[CC_PRIORITY - 1] = v[att[LS_PRIORITY] - 1];
		cc[CC_STEP_ID - 1] = Int64GetDatum(step_id);
		cc[CC_WORKFLOW - 1] = run[LR_WORKFLOW];
		cc[CC_VERSION - 1] = run[LR_VERSION];
		cc[CC_INPUT - 1] = run[LR_INPUT];
		cc[CC_BUSINESS_KEY - 1] = run[LR_BUSINESS_KEY];
		cc_nulls[CC_BUSINESS_KEY - 1] = run_nulls[LR_BUSINESS_KEY];
		cc_nulls[CC_CAUSE - 1] = isnull[att[LS_CAUSE] - 1];
		cc[CC_CAUSE - 1] = cc_nulls[CC_CAUSE - 1] ? (Datum) 0 :
			PointerGetDatum(PG_DETOAST_DATUM_COPY(v[att[LS_CAUSE] - 1]));

		orch_writer_update(w);

		cc[CC_STEPS - 1] = orch_run_outputs(cc[CC_RUN_ID - 1]);
		cc[CC_CONTEXT - 1] = task_context(cc, cc_nulls);
		rows[place] = heap_form_tuple(result_desc, cc, cc_nulls);
		if (place == 0)
			*first_wake = wake_at;
	}
}

/* orch_writer_begin for a lease's columns of orch.steps */
static bool
lease_writer_begin(OrchRowWriter *w)
{
	const int16 *att = orch_row_source_attnums(&lease_step_source);

	return orch_writer_begin(w, lease_step_source.rels[0], CMD_UPDATE,
							 orch_writer_columns(att, LS_STATUS, LS_WAKE_AT));
}

/*
 * Lease the n tasks locked (picked) to the worker, into the caller's
 * materialized result in the order they were locked.
 */
static void
lease_picked(ReturnSetInfo *rsinfo, const OrchPickedTask *picked, int n, text *worker,
			 Interval *lease)
{
	OrchRowWriter w;
	HeapTuple  *rows;
	TimestampTz first_wake = 0;

	if (!lease_writer_begin(&w))
	{
		lease_picked_sql(rsinfo, picked, n, worker, lease);
		return;
	}
	rows = palloc(sizeof(HeapTuple) * n);
	lease_directly(&w, picked, n, worker, lease, rsinfo->setDesc, rows, &first_wake);
	orch_writer_end(&w);
	/* the engine must also wake when these leases expire */
	orch_wake_engines_for_timer_at_end(first_wake);
	for (int i = 0; i < n; i++)
		tuplestore_puttuple(rsinfo->setResult, rows[i]);
}

/* Open what a lease opens, and close it (orch_rolled_back's fn). */
static void
open_lease(void *arg)
{
	OrchRowWriter w;
	pg_uuid_t	none = {{0}};

	(void) orch_row_source_attnums(&lease_run_source);
	(void) orch_row_source_attnums(&lease_definition_source);
	if (lease_writer_begin(&w))
		orch_writer_end(&w);
	(void) orch_run_outputs(UUIDPGetDatum(&none));
}

/*
 * What leasing a task needs the first time in a session, done ahead by a
 * claim about to sleep: where orch.steps needs the UPDATE statement, its
 * plan (orch_plan_ahead); else the look-ups of the rows a lease reads and
 * writes, and the caches of orch.steps, its indexes and its audit
 * rendering, filled by opening what a lease opens (orch_rolled_back: the
 * caches stay, not the locks).  Returns whether it did anything.
 */
static bool
lease_ahead(void)
{
	static bool warmed = false;

	if (orch_writer_refuses(orch_relid("steps"), CMD_UPDATE))
		return orch_plan_ahead(task_plan(T_CLAIM));
	if (warmed)
		return false;
	orch_rolled_back(open_lease, NULL);
	warmed = true;
	return true;
}

/*
 * Lease up to max waiting tasks of the queue into the caller's
 * materialized result.  The step's timeout and heartbeat_timeout cap the
 * lease.  With nothing to claim, wait up to wait_us for a commit that
 * queues tasks (a condition variable, not polling).
 */
static void
claim_into(ReturnSetInfo *rsinfo, text *queue, text *worker, int32 max, Interval *lease,
		   int64 wait_us)
{
	FrontierKey fkey = frontier_key(text_to_cstring(queue));
	Datum		queue_arg = PointerGetDatum(queue);
	TimestampTz deadline;
	OrchPickedTask *picked = palloc(sizeof(OrchPickedTask) * max);
	bool		may_wait;
	int			npicked = 0;
	int64		after[2];
	uint64		generation;
	bool		planned_ahead = false;

	deadline = GetCurrentTimestamp() + Max(wait_us, 0);
	may_wait = wait_us > 0 && OrchShared != NULL;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");

	for (;;)
	{
		long		remaining_ms;
		bool		locked_out = false;
		bool		limited = queue_limited(queue);
		bool		room = true;
		int32		most = max;

		if (OrchShared != NULL)
			ConditionVariablePrepareToSleep(&OrchShared->tasks_ready);

		/*
		 * A limited queue's lock is held until commit: never sleep holding
		 * it.  A claim that may wait looks for room without it, then locks
		 * and claims once; one that does not wait locks and claims at once.
		 */
		if (limited && may_wait)
		{
			if (orch_execute_plan(task_plan(T_QUEUE_ROOM), &queue_arg, NULL, 1) != SPI_OK_SELECT)
				elog(ERROR, "could not read queue");
			if (SPI_processed > 0)
			{
				bool		isnull;

				room = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
												  &isnull));
			}
			else
				limited = false;	/* lifted since */
			SPI_freetuptable(SPI_tuptable);
		}
		if (room)
		{
			bool		skipped;

			if (limited)
			{
				if (orch_execute_plan(task_plan(T_LOCK_QUEUE), &queue_arg, NULL, 1) != SPI_OK_SELECT)
					elog(ERROR, "could not lock queue");
				/* not read-only: a new snapshot, including the claims waited for */
				if (orch_execute_plan(task_plan(T_QUEUE_FREE), &queue_arg, NULL, 1) != SPI_OK_SELECT)
					elog(ERROR, "could not read queue");
				if (SPI_processed > 0)
				{
					bool		isnull;

					most = (int32) Min(most, DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
																		 SPI_tuptable->tupdesc, 1,
																		 &isnull)));
				}
				SPI_freetuptable(SPI_tuptable);
			}
			if (most > 0 && frontier_get(&fkey, &after[0], &after[1], &generation))
			{
				npicked = orch_pick_tasks(queue_arg, after, NULL, 0, most, picked, &skipped);
				locked_out |= skipped;
				frontier_note(&fkey, picked, npicked, npicked == most, false, generation);
			}
			if (npicked < most)
			{
				/* from the head, past the tasks the resumed claim locked */
				int			n = orch_pick_tasks(queue_arg, NULL, picked, npicked, most - npicked,
												picked + npicked, &skipped);

				locked_out |= skipped;
				frontier_note(&fkey, picked + npicked, n, n == most - npicked, true, 0);
				npicked += n;
			}
			/* a limited queue's lock is held now: no sleeping */
			if (npicked > 0 || limited || !may_wait)
				break;
		}

		/*
		 * Nothing claimed.  When the claim passed over tasks (locked by a
		 * claim that has not committed yet, or by an engine batch whose
		 * claim locked a task it then found already queued: a row lock
		 * taken before a recheck outlives it), that batch's commit wakes no
		 * one, so do not wait for a wake-up: look again shortly.
		 */
		remaining_ms = (long) ((deadline - GetCurrentTimestamp()) / 1000);
		if (remaining_ms <= 0)
			break;
		if (locked_out)
			remaining_ms = Min(remaining_ms, LOCKED_OUT_RETRY_MS);

		/*
		 * Leasing a task runs only once there is one: make ready for it now
		 * (a session's first claim), not after the wake-up, when the
		 * milliseconds that takes would delay the task.  Getting ready ends
		 * in a subtransaction rolled back, which cancels the preparation to
		 * sleep: having got ready, look again, prepared anew, before
		 * sleeping (a sleep not prepared for returns at once, and the claim
		 * would spin).
		 */
		if (!planned_ahead)
		{
			planned_ahead = true;
			if (lease_ahead())
				continue;
		}

		/*
		 * A broadcast that came while we looked took us off the wait list
		 * and set our latch, but a lock wait inside the claim may have
		 * reset the latch since; the sleep would then last the whole
		 * timeout.  With the latch set, the sleep first checks whether we
		 * are still on the list, and returns at once if not.
		 */
		SetLatch(MyLatch);
		(void) ConditionVariableTimedSleep(&OrchShared->tasks_ready, remaining_ms,
										   PG_WAIT_EXTENSION);
	}
	if (OrchShared != NULL)
		ConditionVariableCancelSleep();

	if (npicked > 0)
		lease_picked(rsinfo, picked, npicked, worker, lease);
	SPI_finish();
}

/* orch.claim_tasks(queue, worker, max, lease, wait) */
PG_FUNCTION_INFO_V1(orch_claim_tasks);
Datum
orch_claim_tasks(PG_FUNCTION_ARGS)
{
	text	   *worker = PG_GETARG_TEXT_PP(1);
	int32		max = PG_GETARG_INT32(2);
	Interval   *lease = PG_GETARG_INTERVAL_P(3);
	int64		wait_us = interval_to_usecs(PG_GETARG_INTERVAL_P(4));

	check_claim_args(worker, max, lease);
	if (IsolationUsesXactSnapshot() && wait_us > 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("orch.claim_tasks cannot wait inside a REPEATABLE READ or SERIALIZABLE transaction")));
	if (OrchShared == NULL && wait_us > 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("orch.claim_tasks can wait only with orchestrator in shared_preload_libraries")));

	InitMaterializedSRF(fcinfo, 0);
	claim_into((ReturnSetInfo *) fcinfo->resultinfo, PG_GETARG_TEXT_PP(0), worker, max, lease,
			   wait_us);
	return (Datum) 0;
}

/*
 * The checks of a success's lease token (argument 0) and output (argument
 * 1), for orch.complete_task and orch.complete_and_claim.
 */
static void
check_completion_args(FunctionCallInfo fcinfo)
{
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the lease token must not be NULL")));
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the output of a task must not be NULL"),
				 errhint("Complete with '{}' when there is nothing to report.")));
}

/* The task leased with token succeeded with this output. */
static void
complete_held_task(Datum token, Datum output)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	orch_finish_task(token, output, NULL, NULL, NULL);
	SPI_finish();
}

/*
 * orch.complete_and_claim(token, output, queue, worker, max, lease): a
 * worker's loop in one transaction and one round trip: complete the task
 * it holds, then lease the next ones.  It never waits for tasks to come:
 * the completion must commit before a worker sleeps, so a worker that gets
 * nothing back waits in orch.claim_tasks.  A refused verdict is an error,
 * as in orch.complete_task, and nothing is claimed.
 */
PG_FUNCTION_INFO_V1(orch_complete_and_claim);
Datum
orch_complete_and_claim(PG_FUNCTION_ARGS)
{
	static const char *const argname[6] = {NULL, NULL, "queue", "worker", "max", "lease"};
	text	   *worker;
	int32		max;
	Interval   *lease;

	check_completion_args(fcinfo);
	for (int i = 2; i < 6; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not be NULL", argname[i])));
	worker = PG_GETARG_TEXT_PP(3);
	max = PG_GETARG_INT32(4);
	lease = PG_GETARG_INTERVAL_P(5);
	check_claim_args(worker, max, lease);

	InitMaterializedSRF(fcinfo, 0);
	complete_held_task(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1));
	claim_into((ReturnSetInfo *) fcinfo->resultinfo, PG_GETARG_TEXT_PP(2), worker, max, lease, 0);
	return (Datum) 0;
}

/* orch.complete_task(token, output) */
PG_FUNCTION_INFO_V1(orch_complete_task);
Datum
orch_complete_task(PG_FUNCTION_ARGS)
{
	check_completion_args(fcinfo);
	complete_held_task(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1));
	PG_RETURN_VOID();
}

/*
 * orch.complete_tasks(tokens, outputs): returns (token, completed, detail)
 * for each token, in the order given.
 */
PG_FUNCTION_INFO_V1(orch_complete_tasks_sql);
Datum
orch_complete_tasks_sql(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *tokens_arr = PG_GETARG_ARRAYTYPE_P(0);
	ArrayType  *outputs_arr = PG_GETARG_ARRAYTYPE_P(1);
	Datum	   *tokens;
	Datum	   *outputs;
	bool	   *tnulls;
	bool	   *onulls;
	int			n;
	int			nout;
	bool	   *accepted;
	char	  **why;
	MemoryContext callercxt;

	if (ARR_NDIM(tokens_arr) > 1 || ARR_NDIM(outputs_arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("tokens and outputs must be one-dimensional arrays")));
	deconstruct_array(tokens_arr, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR, &tokens, &tnulls, &n);
	deconstruct_array(outputs_arr, JSONBOID, -1, false, TYPALIGN_INT, &outputs, &onulls, &nout);
	if (n != nout)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("tokens has %d elements but outputs has %d", n, nout),
				 errhint("outputs[i] is the output of the task leased with tokens[i].")));
	if (n > 10000)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("at most 10000 tasks can be completed at once, not %d", n)));
	for (int i = 0; i < n; i++)
		if (tnulls[i] || onulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s %d is NULL", tnulls[i] ? "token" : "output", i + 1),
					 tnulls[i] ? 0 : errhint("Complete with '{}' when there is nothing to report.")));

	InitMaterializedSRF(fcinfo, 0);
	if (n == 0)
		return (Datum) 0;
	accepted = palloc(sizeof(bool) * n);
	why = palloc(sizeof(char *) * n);

	callercxt = CurrentMemoryContext;	/* the reasons must outlive SPI */
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	orch_complete_tasks(n, tokens, outputs, accepted, why, callercxt);
	SPI_finish();

	for (int i = 0; i < n; i++)
	{
		Datum		values[3];
		bool		nulls[3] = {false, false, why[i] == NULL};

		values[0] = tokens[i];
		values[1] = BoolGetDatum(accepted[i]);
		values[2] = why[i] ? CStringGetTextDatum(why[i]) : (Datum) 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/* orch.fail_task(token, error, error_class, detail) */
PG_FUNCTION_INFO_V1(orch_fail_task);
Datum
orch_fail_task(PG_FUNCTION_ARGS)
{
	char	   *error;
	char	   *class;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the lease token, the error and its class must not be NULL")));
	error = text_to_cstring(PG_GETARG_TEXT_PP(1));
	class = text_to_cstring(PG_GETARG_TEXT_PP(2));
	if (strcmp(class, "transient") != 0 && strcmp(class, "permanent") != 0 &&
		strcmp(class, "unknown_outcome") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown error class \"%s\"", class),
				 errhint("Error classes are transient, permanent and unknown_outcome.")));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	orch_finish_task(PG_GETARG_DATUM(0), (Datum) 0, error, class,
					 PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3)));
	SPI_finish();
	PG_RETURN_VOID();
}
