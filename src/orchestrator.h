/*-------------------------------------------------------------------------
 * orchestrator.h
 *	  What the subsystems of orchestrator share: settings, the shared-memory
 *	  state of the launcher and engine workers, and their entry points.
 *-------------------------------------------------------------------------
 */
#ifndef ORCHESTRATOR_H
#define ORCHESTRATOR_H

#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

/*
 * Whether the run alias's status is one of statuses (a list of quoted
 * labels), for a statement that reaches the run by its key.  Written as a
 * CASE, which the planner neither estimates from the statistics nor matches
 * to the partial index runs_active: as status IN (...), statistics taken
 * while every run had finished (a quiet hour before a burst of starts)
 * estimate a single unfinished run, and the cached plan then scanned all of
 * runs_active for each run it looked up, instead of its primary key.
 */
#define ORCH_RUN_STATUS_IN(run, statuses) \
	"CASE WHEN " run ".status IN (" statuses ") THEN true ELSE false END"

/*
 * The outputs of a run's succeeded steps by name, as a jsonb object ('{}'
 * when none): a scalar subquery for the run whose id is the SQL expression
 * run.  Ordered by the key of orch.steps' (run_id, name) index, which, with
 * sorts off for the engine's statements, leaves the planner that index
 * alone whatever the statistics say.
 */
#define ORCH_STEP_OUTPUTS_SQL(run) \
	"(SELECT COALESCE(pg_catalog.jsonb_object_agg(p.name, p.output), '{}')" \
	"   FROM (SELECT p0.name, p0.output FROM orch.steps p0" \
	"          WHERE p0.run_id = " run " AND p0.status = 'succeeded'" \
	"          ORDER BY p0.run_id, p0.name OFFSET 0) p)"

#define ORCH_EXTENSION_NAME		"orchestrator"
#define ORCH_MAX_WORKERS_PER_DB	16
/* the worker_index of a database's sealer, after those of its engine workers */
#define ORCH_SEALER_INDEX		ORCH_MAX_WORKERS_PER_DB

/* settings (orchestrator.*) */
extern bool orch_enabled;
extern int	orch_workers_per_database;
extern int	orch_batch_size;
extern int	orch_max_sleep_ms;
extern int	orch_launcher_naptime_s;

/* an engine slot's life, as the launcher and the worker see it */
typedef enum OrchSlotState
{
	ORCH_SLOT_FREE = 0,
	ORCH_SLOT_STARTING,			/* registered by the launcher */
	ORCH_SLOT_RUNNING,			/* the worker is connected and working */
	ORCH_SLOT_NO_EXTENSION,		/* the database does not have the extension */
	ORCH_SLOT_EXITED			/* the worker has gone */
} OrchSlotState;

typedef struct OrchEngineSlot
{
	OrchSlotState state;
	Oid			dboid;
	int			worker_index;	/* 0 .. workers_per_database - 1, or ORCH_SEALER_INDEX */
	bool		stop_requested; /* asked to leave, e.g. for DROP DATABASE */
	pid_t		pid;
	Latch	   *latch;
	TimestampTz started_at;
	TimestampTz last_batch_at;
	uint64		steps_done;
	TimestampTz sleep_until;	/* while asleep: its next timer; 0 while busy */
	TimestampTz wake_by;		/* while busy: the earliest timer committed since, or 0 */
} OrchEngineSlot;

/*
 * Where claims from a task queue resume: the key, in claim order, of the
 * last task a claim from it took (api_tasks.c).  Shared by the sessions of
 * a database so that a claim does not step over the tasks the others took
 * since; a slot is found by a hash of database and queue, and a queue
 * whose slot another takes over just claims from its head.
 */
#define ORCH_CLAIM_FRONTIERS	64

typedef struct OrchClaimFrontier
{
	Oid			dboid;			/* InvalidOid: unused */
	char		queue[NAMEDATALEN];
	bool		valid;			/* the last claim from here got all it asked for */
	uint64		generation;		/* bumped when the point is set from the head */
	int64		neg_priority;	/* its last task's key */
	int64		step_id;
	TimestampTz head_at;		/* when a claim last started from the head */
} OrchClaimFrontier;

typedef struct OrchSharedState
{
	slock_t		mutex;			/* protects everything below but the CVs and frontiers */
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	uint64		launcher_wakeups;	/* bumped by every request to look again */
	ConditionVariable run_finished; /* broadcast when runs may have finished */
	ConditionVariable tasks_ready;	/* broadcast when tasks may have been queued */
	slock_t		frontiers_lock; /* protects frontiers */
	OrchClaimFrontier frontiers[ORCH_CLAIM_FRONTIERS];
	int			nslots;
	OrchEngineSlot slots[FLEXIBLE_ARRAY_MEMBER];
} OrchSharedState;

extern OrchSharedState *OrchShared;

/* shmem.c */
extern void orch_shmem_request(void);
extern void orch_shmem_startup(void);
extern int	orch_slot_reserve(Oid dboid, int worker_index);
extern void orch_slot_free(int slotno);
extern OrchSlotState orch_slot_state(int slotno, bool *stop_requested);
extern void orch_stop_engines_for_database(Oid dboid);

/* wakeup.c */
extern void orch_register_xact_callback(void);
extern void orch_wake_engines_at_end(void);
extern void orch_wake_engines_for_timer_at_end(TimestampTz timer);
extern void orch_broadcast_runs_at_end(void);
extern TimestampTz orch_engine_sleeping(int slotno, TimestampTz until);
extern void orch_wake_engines(Oid dboid);
extern void orch_wake_launcher(bool look_again);

/* launcher.c, engine.c */
extern void orch_launcher_register(void);
extern PGDLLEXPORT void orch_launcher_main(Datum main_arg);
extern PGDLLEXPORT void orch_engine_main(Datum main_arg);
extern PGDLLEXPORT void orch_sealer_main(Datum main_arg);

/* steps.c */
typedef struct OrchBatchResult
{
	int			claimed;		/* steps looked at */
	int			executed;		/* sql step attempts made */
	int			runs_finished;	/* runs that ended, or now wait for a person */
	int			tasks_queued;	/* task steps put in their queues */
	bool		made_ready;		/* some step became ready */
} OrchBatchResult;

extern void orch_process_batch(int max_steps, const char *worker, OrchBatchResult *result);
extern TimestampTz orch_next_timer(void);
extern int64 orch_last_step_id;
extern void orch_forget_claim_position(void);
extern void orch_complete_tasks(int n, Datum *tokens, Datum *outputs,
								bool *accepted, char **why, MemoryContext callercxt);
extern bool orch_error_is_transient(int sqlerrcode);
extern void orch_quarantine_step(int64 step_id, ErrorData *edata);
extern void orch_planner_install(void);
extern int	orch_execute_plan(SPIPlanPtr plan, Datum *values, const char *nulls, long count);
extern bool orch_plan_ahead(SPIPlanPtr plan);
extern void orch_rolled_back(void (*fn) (void *arg), void *arg);
extern void orch_finish_task(Datum token, Datum output, const char *error,
							 const char *error_class, const char *detail);

/* jsonschema.c */
extern bool orch_schema_first_violation(Jsonb *value, Jsonb *schema, char **path,
										char **message);

/*
 * rowfetch.c: a row source for orch_row_fetch: table orch.<table>, read
 * by the key of its unique btree index orch.<index> (nkeys columns), the
 * columns cols.  Declared static by the caller with table, index, nkeys,
 * ncols and cols set; the rest is filled on first use.
 */
#define ORCH_ROW_MAX_KEYS	3
#define ORCH_ROW_MAX_COLS	40

typedef struct OrchRowSource
{
	const char *table;
	const char *index;
	int			nkeys;
	int			ncols;
	const char *cols[ORCH_ROW_MAX_COLS];
	/* resolved on first use, and again after an invalidation */
	bool		ready;
	bool		registered;
	struct OrchRowSource *next;
	Oid			rels[2];		/* the table, the index */
	Oid			key_eq[ORCH_ROW_MAX_KEYS];	/* equality function */
	Oid			key_collation[ORCH_ROW_MAX_KEYS];
	int16		key_attnum[ORCH_ROW_MAX_KEYS];
	int16		attnum[ORCH_ROW_MAX_COLS];
	int16		typlen[ORCH_ROW_MAX_COLS];
	bool		typbyval[ORCH_ROW_MAX_COLS];
} OrchRowSource;

/* a value a fetched row must hold: src->cols[col] = value */
typedef struct OrchRowMatch
{
	int			col;
	Datum		value;
} OrchRowMatch;

extern const int16 *orch_row_source_attnums(OrchRowSource *src);
extern bool orch_row_lock(OrchRowSource *src, const Datum *keys, const OrchRowMatch *m,
						  TupleTableSlot *slot);
extern bool orch_row_fetch(OrchRowSource *src, const Datum *keys, bool lock,
						   Datum *values, bool *nulls);
extern bool orch_row_fetch_match(OrchRowSource *src, const Datum *keys, const OrchRowMatch *m,
								 bool lock, Datum *values, bool *nulls);
extern Oid	orch_relid(const char *name);
extern Oid	orch_relid_extended(const char *name, bool missing_ok);

/* uuid_v7.c: the step a lease token names */
extern bool orch_lease_token_step(Datum token, int64 *step_id);
extern Datum orch_lease_token_make(int64 step_id);

/* rowfetch.c: a task locked by orch_pick_tasks, and its key in its queue */
typedef struct OrchPickedTask
{
	int64		step_id;
	int64		neg_priority;	/* - priority */
	ItemPointerData tid;		/* the row locked, its newest version */
} OrchPickedTask;

extern Oid	orch_enum_oid(Oid typid, const char *label);
extern Datum orch_run_outputs(Datum run_id);
extern void orch_push_jsonb(JsonbParseState **ps, Jsonb *jb);
extern int	orch_pick_tasks(Datum queue, const int64 *after, const OrchPickedTask *taken,
							int ntaken, int max, OrchPickedTask *out, bool *skipped);

/*
 * rowwrite.c: rows of an orchestrator table updated without the executor,
 * where the executor would do no more (orch_writer_begin false: it would).
 */
typedef struct OrchRowWriter
{
	Relation	rel;
	CmdType		op;				/* CMD_UPDATE or CMD_INSERT */
	struct EState *estate;
	struct ResultRelInfo *rri;
	TupleTableSlot *before;		/* the row to update: orch_writer_fetch, orch_writer_lock */
	TupleTableSlot *after;		/* the row written */
	Datum	   *values;			/* the next row's values and nulls, filled by the caller */
	bool	   *nulls;
	bool	   *written;		/* by attribute number - 1 */
	bool	   *is_domain;		/* a column written whose type is a domain */
	void	  **domain;			/* domain_check's cache of each */
	bool		row_triggers;	/* AFTER ROW triggers to fire */
	struct OrchAuditRows *audit;
} OrchRowWriter;

extern void orch_open_indices(struct ResultRelInfo *rri);
extern bool *orch_writer_columns(const int16 *att, int from, int to);
extern bool orch_writer_refuses(Oid relid, CmdType op);
extern bool orch_writer_begin(OrchRowWriter *w, Oid relid, CmdType op, const bool *written);
extern TupleTableSlot *orch_writer_fetch(OrchRowWriter *w, ItemPointer tid);
extern bool orch_writer_lock(OrchRowWriter *w, OrchRowSource *src, const Datum *keys,
							 const OrchRowMatch *m);
extern void orch_writer_update(OrchRowWriter *w);
extern void orch_writer_insert(OrchRowWriter *w);
extern void orch_writer_end(OrchRowWriter *w);

#endif							/* ORCHESTRATOR_H */
