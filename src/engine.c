/*-------------------------------------------------------------------------
 * engine.c
 *	  The engine worker: connected to one database, it advances that
 *	  database's runs in batches, one transaction per batch, and sleeps on
 *	  its latch until a commit makes work ready, the earliest timer comes
 *	  due, or orchestrator.max_sleep passes.
 *
 *	  orch.tick() runs the same batch in the calling session.
 *
 *	  The sealer: connected to one database too, it seals that database's
 *	  finished audit rows every orchestrator.audit_seal_interval, in a
 *	  process of its own, so that no batch waits for a seal and no long
 *	  step holds sealing (and its heartbeat blocks) back.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_extension.h"
#include "storage/lmgr.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/snapmgr.h"

#include "orchestrator.h"
#include "audit.h"

/*
 * How soon to look again at due steps that a batch skipped because another
 * transaction held their run locked (one that did not ask for a wake-up).
 */
#define LOCKED_RETRY_MS		100

static int	my_slotno = -1;

/* in_own_transaction found the extension dropped */
static bool extension_gone = false;

/*
 * After a batch failed outside any step's subtransaction, the engine
 * advances one step per batch for a while, so that the step behind the
 * error is found (and set aside) while the others go on.
 */
static int	single_step_batches = 0;

static void
engine_detach(int code, Datum arg)
{
	SpinLockAcquire(&OrchShared->mutex);
	if (OrchShared->slots[my_slotno].state == ORCH_SLOT_RUNNING)
		OrchShared->slots[my_slotno].state = ORCH_SLOT_EXITED;
	OrchShared->slots[my_slotno].pid = 0;
	OrchShared->slots[my_slotno].latch = NULL;
	SpinLockRelease(&OrchShared->mutex);
}

/* The database lacks the extension (or lost it): say so in the slot, and exit. */
static void
leave_without_extension(void)
{
	SpinLockAcquire(&OrchShared->mutex);
	OrchShared->slots[my_slotno].state = ORCH_SLOT_NO_EXTENSION;
	SpinLockRelease(&OrchShared->mutex);
	proc_exit(0);
}

/*
 * Lock the extension against DROP EXTENSION until the end of the current
 * transaction, and say whether it is (still) installed.  Called before the
 * transaction touches any of the extension's tables.  DROP EXTENSION locks
 * the extension first and its tables after; an engine transaction that
 * locked some of those tables first and then waited for another could
 * deadlock with it, and the deadlock would fail the DROP.  Now one of the
 * two waits for the other's whole transaction.
 */
static bool
lock_extension(void)
{
	Oid			ext = get_extension_oid(ORCH_EXTENSION_NAME, true);

	if (!OidIsValid(ext))
		return false;
	LockDatabaseObject(ExtensionRelationId, ext, 0, AccessShareLock);
	/* a DROP EXTENSION we waited for has committed */
	return get_extension_oid(ORCH_EXTENSION_NAME, true) == ext;
}

static void
slot_update_after_batch(int steps)
{
	SpinLockAcquire(&OrchShared->mutex);
	OrchShared->slots[my_slotno].last_batch_at = GetCurrentTimestamp();
	OrchShared->slots[my_slotno].steps_done += steps;
	SpinLockRelease(&OrchShared->mutex);
}

/*
 * Statistics of the queue tables that describe them as nearly empty while
 * they hold many live rows come from an ANALYZE that ran while a big
 * transaction was filling them (its rows were not live yet).  Every plan
 * made from them would join by full scans.  The engine's own statements are
 * written to be planned alike whatever the statistics say, but the workers'
 * claims and the applications' queries are not: refresh them.  Looked at
 * once a second, refreshed at most every 10 seconds, without waiting for a
 * lock: while a VACUUM or ANALYZE holds either table (an autovacuum may be
 * at it already), the refresh waits for the next look.  The engine takes
 * the tables' locks itself, without waiting, rather than ask ANALYZE to
 * skip locked tables: that ANALYZE reports each table it skips as a
 * WARNING in the server log, once a second for as long as the lock is
 * held.  Each worker logs a skip once per stretch of them.
 */
#define STATS_CHECK_INTERVAL_US		USECS_PER_SEC
#define STATS_REFRESH_INTERVAL_US	(10 * USECS_PER_SEC)

static void
refresh_misleading_statistics(void)
{
	static TimestampTz last_check = 0;
	static TimestampTz last_refresh = 0;
	static bool skipping = false;	/* the last look found the tables held */
	TimestampTz now = GetCurrentTimestamp();
	bool		isnull;
	bool		misleading;
	Oid			steps;
	Oid			runs;
	bool		busy;

	if (now - last_check < STATS_CHECK_INTERVAL_US ||
		(last_refresh != 0 && now - last_refresh < STATS_REFRESH_INTERVAL_US))
		return;
	last_check = now;
	if (SPI_execute("SELECT EXISTS (SELECT FROM pg_catalog.pg_class c"
					"  WHERE c.oid IN ('orch.steps'::pg_catalog.regclass, 'orch.runs'::pg_catalog.regclass)"
					"    AND c.reltuples >= 0"
					"    AND pg_catalog.pg_stat_get_live_tuples(c.oid) > 10 * (c.reltuples + 100))",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not read the statistics of orch.steps and orch.runs");
	misleading = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
											&isnull));
	SPI_freetuptable(SPI_tuptable);
	if (!misleading)
	{
		skipping = false;		/* (another worker refreshed them) */
		return;
	}
	steps = orch_relid("steps");
	runs = orch_relid("runs");
	/* the lock ANALYZE takes, held to the end of this transaction (the batch's) */
	busy = !ConditionalLockRelationOid(steps, ShareUpdateExclusiveLock);
	if (!busy && !ConditionalLockRelationOid(runs, ShareUpdateExclusiveLock))
	{
		/* not orch.steps's either, for the batch that follows */
		UnlockRelationOid(steps, ShareUpdateExclusiveLock);
		busy = true;
	}
	if (busy)
	{
		if (!skipping)
			elog(LOG, "orchestrator: the statistics of orch.steps and orch.runs describe them as (almost) empty, but another session holds the lock ANALYZE needs (a VACUUM or an ANALYZE, say): refreshing them once it is released");
		skipping = true;
		return;
	}
	skipping = false;
	last_refresh = now;
	elog(LOG, "orchestrator: refreshing the statistics of orch.steps and orch.runs, which describe them as (almost) empty");
	if (SPI_execute("ANALYZE orch.steps, orch.runs", false, 0) != SPI_OK_UTILITY)
		elog(ERROR, "could not analyze orch.steps and orch.runs");
}

/*
 * Do work(arg) in a transaction of its own, with SPI connected; false if it
 * failed (logged, rolled back) or was not done (the extension is gone).
 * read_committed: a fresh snapshot for each statement, whatever
 * default_transaction_isolation says.
 */
static bool
in_own_transaction(void (*work) (void *arg), void *arg, bool read_committed)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		if (read_committed)
			XactIsoLevel = XACT_READ_COMMITTED;
		if (lock_extension())
		{
			PushActiveSnapshot(GetTransactionSnapshot());
			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			work(arg);
			SPI_finish();
			PopActiveSnapshot();
		}
		else
		{
			ok = false;			/* DROP EXTENSION: the next batch leaves */
			extension_gone = true;
		}
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(oldcxt);
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
	return ok;
}

typedef struct Quarantine
{
	int64		step_id;
	ErrorData  *cause;
} Quarantine;

static void
quarantine_work(void *arg)
{
	Quarantine *q = arg;

	orch_quarantine_step(q->step_id, q->cause);
}

/*
 * Set a step aside in a transaction of its own; false (logged) if that
 * failed too, for instance because the cause lies in orch.steps itself.
 */
static bool
quarantine(int64 step_id, ErrorData *cause)
{
	Quarantine	q = {step_id, cause};

	if (!in_own_transaction(quarantine_work, &q, false))
		return false;
	/* its run now waits for a person: so does nobody in orch.wait_run */
	ConditionVariableBroadcast(&OrchShared->run_finished);
	return true;
}

/*
 * One batch in a transaction of its own.  Returns false if it failed: the
 * error is logged, the transaction rolled back, and the following batches
 * advance one step each until one fails again, whose step is then set
 * aside for a human (orch_quarantine_step) instead of stopping the engine
 * over and over.
 */
static bool
run_batch(OrchBatchResult *result, const char *worker_name, MemoryContext loop_cxt,
		  TimestampTz *next_timer)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ErrorData  *edata;
	int64		blamed;
	bool		single = single_step_batches > 0;

	orch_last_step_id = 0;		/* only a step this batch advances can be blamed */
	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		if (!lock_extension())
		{
			/* DROP EXTENSION: leave; the launcher looks again later */
			CommitTransactionCommand();
			leave_without_extension();
		}
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "orchestrator: advancing runs");
		MemoryContextSwitchTo(loop_cxt);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		refresh_misleading_statistics();
		orch_process_batch(single ? 1 : orch_batch_size, worker_name, result);
		if (result->claimed == 0)
			*next_timer = orch_next_timer();
		SPI_finish();
		MemoryContextSwitchTo(oldcxt);
		PopActiveSnapshot();
		CommitTransactionCommand();
		pgstat_report_stat(false);
		pgstat_report_activity(STATE_IDLE, NULL);
		MemoryContextReset(loop_cxt);
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextReset(loop_cxt);
		pgstat_report_activity(STATE_IDLE, NULL);
		RESUME_INTERRUPTS();

		orch_forget_claim_position();
		blamed = orch_last_step_id;
		if (single && blamed != 0 && !orch_error_is_transient(edata->sqlerrcode) &&
			quarantine(blamed, edata))
		{
			/* a batch of one step: that step was the cause, and is set aside */
			ereport(WARNING,
					(errmsg("orchestrator set step %lld aside for a human after an error in its batch: %s",
							(long long) blamed, edata->message),
					 errhint("The step and its run are in needs_human; orch.retry_run runs it again once the cause is fixed.")));
			single_step_batches = 0;
		}
		else
		{
			/* look for the step behind it, one step per batch, after a pause */
			single_step_batches = Max(orch_batch_size, 10);
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 single ? 1000L : 100L, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
		FreeErrorData(edata);
		MemoryContextSwitchTo(oldcxt);
		return false;
	}
	PG_END_TRY();

	if (single && (--single_step_batches == 0 || result->claimed == 0))
		single_step_batches = 0;
	return true;
}

/*
 * Attach to the slot the launcher reserved (main_arg), connect to its
 * database and check for the extension; without it, say so in the slot
 * and exit.  An engine worker's latch is in its slot, for commits that
 * make work ready to set; the sealer's is not.
 */
static void
worker_attach(Datum main_arg, const char *appname, bool wakeable)
{
	Oid			dboid;
	bool		present;

	my_slotno = DatumGetInt32(main_arg);

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	SpinLockAcquire(&OrchShared->mutex);
	dboid = OrchShared->slots[my_slotno].dboid;
	OrchShared->slots[my_slotno].pid = MyProcPid;
	SpinLockRelease(&OrchShared->mutex);
	before_shmem_exit(engine_detach, (Datum) 0);

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	pgstat_report_appname(appname);

	StartTransactionCommand();
	present = lock_extension();
	CommitTransactionCommand();
	if (!present)
		leave_without_extension();

	SpinLockAcquire(&OrchShared->mutex);
	OrchShared->slots[my_slotno].state = ORCH_SLOT_RUNNING;
	OrchShared->slots[my_slotno].latch = wakeable ? MyLatch : NULL;
	OrchShared->slots[my_slotno].started_at = GetCurrentTimestamp();
	SpinLockRelease(&OrchShared->mutex);
}

void
orch_engine_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	char		worker_name[64];

	worker_attach(main_arg, "orchestrator engine", true);
	/* the database has the extension: the launcher starts its sealer now */
	if (OrchShared->slots[my_slotno].worker_index == 0)
		orch_wake_launcher(false);

	snprintf(worker_name, sizeof(worker_name), "engine:%d", MyProcPid);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "orchestrator engine batch",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		OrchBatchResult result;
		TimestampTz next_timer = DT_NOEND;
		long		sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		memset(&result, 0, sizeof(result));
		if (orch_enabled && !run_batch(&result, worker_name, loop_cxt, &next_timer))
		{
			/* the batch failed and was rolled back; see run_batch */
			continue;
		}
		if (orch_enabled)
		{
			if (result.runs_finished > 0)
				ConditionVariableBroadcast(&OrchShared->run_finished);
			if (result.tasks_queued > 0)
				ConditionVariableBroadcast(&OrchShared->tasks_ready);
			if (result.claimed > 0)
				slot_update_after_batch(result.claimed);
		}
		/* Work begets work: a finished step may have made others ready. */
		if (orch_enabled && result.claimed > 0)
			continue;
		sleep_ms = orch_max_sleep_ms;
		if (orch_enabled && next_timer != DT_NOEND)
		{
			long		until_next = (long) ((next_timer - GetCurrentTimestamp()) / 1000) + 1;

			/* a timer already due means its steps were locked: look again soon */
			if (until_next <= 0)
				until_next = LOCKED_RETRY_MS;
			sleep_ms = Min(sleep_ms, until_next);
		}
		if (sleep_ms > 0)
		{
			TimestampTz now = GetCurrentTimestamp();
			TimestampTz until = orch_engine_sleeping(my_slotno,
													 TimestampTzPlusMilliseconds(now, sleep_ms));

			/* a timer committed during the batch may come sooner */
			sleep_ms = until > now ? (long) ((until - now) / 1000) + 1 : 0;
			if (sleep_ms > 0)
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 sleep_ms, PG_WAIT_EXTENSION);
			orch_engine_sleeping(my_slotno, 0);
			ResetLatch(MyLatch);
		}
	}
}

static void
seal_work(void *arg)
{
	MemoryContext loop_cxt = (MemoryContext) arg;
	MemoryContext oldcxt = MemoryContextSwitchTo(loop_cxt);

	pgstat_report_activity(STATE_RUNNING, "orchestrator: sealing the audit trail");
	(void) orch_audit_seal(true);
	MemoryContextSwitchTo(oldcxt);
}

/*
 * The sealer of one database (audit_seal.c does the sealing): a seal every
 * orchestrator.audit_seal_interval, each in a transaction of its own, and
 * at once after a reload (the interval may have changed).  A seal that
 * fails is logged and tried again at the next interval: nothing is lost,
 * rows wait unsealed.  Like the engine, it does nothing while
 * orchestrator.enabled is off.
 */
void
orch_sealer_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	TimestampTz next_seal_at = 0;

	worker_attach(main_arg, "orchestrator sealer", false);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "orchestrator seal",
									 ALLOCSET_DEFAULT_SIZES);

#ifdef __GLIBC__
	/*
	 * A seal allocates about the same few megabytes every interval (its
	 * rows' hashes and tags, the block's row) and frees them at its end.
	 * glibc hands most of that back to the kernel each time (its larger
	 * allocations are mappings of their own, and the heap is trimmed past
	 * twice the largest one freed), and the next seal faults every page in
	 * again and has the kernel zero it: in a profile under load, nearly a
	 * quarter of the sealer's samples.  This process keeps what it freed,
	 * up to 64 MB; a seal of 100,000 rows (a full block) needs about 11.
	 */
	(void) mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
	(void) mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
#endif

	for (;;)
	{
		long		sleep_ms = orch_max_sleep_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			next_seal_at = 0;	/* the interval may have changed: seal, then count anew */
		}

		if (orch_enabled)
		{
			TimestampTz now = GetCurrentTimestamp();

			if (now >= next_seal_at)
			{
				(void) in_own_transaction(seal_work, loop_cxt, true);
				pgstat_report_activity(STATE_IDLE, NULL);
				MemoryContextReset(loop_cxt);
				/* DROP EXTENSION: leave; the launcher looks again later */
				if (extension_gone)
					leave_without_extension();
				now = GetCurrentTimestamp();
				next_seal_at = TimestampTzPlusMilliseconds(now, orch_audit_seal_interval_ms);
			}
			sleep_ms = Max((long) ((next_seal_at - now) / 1000) + 1, 1);
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * orch.tick(max_steps): one batch in the calling session; returns the
 * number of steps it looked at.
 */
PG_FUNCTION_INFO_V1(orch_tick);
Datum
orch_tick(PG_FUNCTION_ARGS)
{
	int			max_steps = PG_GETARG_INT32(0);
	OrchBatchResult result;
	char		worker_name[64];

	if (max_steps < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_steps must be at least 1")));

	snprintf(worker_name, sizeof(worker_name), "tick:%d", MyProcPid);
	memset(&result, 0, sizeof(result));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	orch_process_batch(max_steps, worker_name, &result);
	SPI_finish();

	if (result.claimed > 0)
		orch_wake_engines_at_end();
	PG_RETURN_INT32(result.claimed);
}
