/*-------------------------------------------------------------------------
 * wakeup.c
 *	  Wake-up on commit.  A function that makes work ready asks for a wake-up;
 *	  the transaction callback sets the engine workers' latches only once the
 *	  transaction has ended, so a worker never wakes to rows it cannot see yet.
 *
 *	  An aborted transaction that asked wakes the workers too: it may have
 *	  held a run row locked (cancel_run, pause_run, ... lock the run first),
 *	  and a worker whose claim skipped that run must look again once the
 *	  lock is gone.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"

#include "orchestrator.h"

static bool wake_engines_at_end = false;
static bool wake_launcher_at_commit = false;
static bool broadcast_runs_at_commit = false;
static TimestampTz new_timer_at = 0;	/* earliest timer this transaction set */

static void wake_engines_before(Oid dboid, TimestampTz timer);

static void
orch_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_engines_at_end && OrchShared != NULL)
			{
				orch_wake_engines(MyDatabaseId);
				/* a committed change may have finished runs or queued tasks */
				ConditionVariableBroadcast(&OrchShared->run_finished);
				ConditionVariableBroadcast(&OrchShared->tasks_ready);
			}
			else if (OrchShared != NULL)
			{
				if (new_timer_at != 0)
					wake_engines_before(MyDatabaseId, new_timer_at);
				if (broadcast_runs_at_commit)
				{
					ConditionVariableBroadcast(&OrchShared->run_finished);
					ConditionVariableBroadcast(&OrchShared->tasks_ready);
				}
			}
			if (wake_launcher_at_commit && OrchShared != NULL)
				orch_wake_launcher(true);
			wake_engines_at_end = false;
			wake_launcher_at_commit = false;
			broadcast_runs_at_commit = false;
			new_timer_at = 0;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			if (wake_engines_at_end && OrchShared != NULL)
				orch_wake_engines(MyDatabaseId);
			wake_engines_at_end = false;
			wake_launcher_at_commit = false;
			broadcast_runs_at_commit = false;
			new_timer_at = 0;
			break;
		default:
			break;
	}
}

void
orch_register_xact_callback(void)
{
	RegisterXactCallback(orch_xact_callback, NULL);
}

void
orch_wake_engines_at_end(void)
{
	wake_engines_at_end = true;
}

/*
 * Wake the engines of a database that sleep past timer.  A busy engine may
 * have taken the snapshot for its next timer before this commit: the timer
 * is left in its slot, and it sleeps no longer than that (setting its latch
 * instead would keep an engine busy for as long as claims stream in).  An
 * engine asleep with an earlier timer will see this one in time.
 */
static void
wake_engines_before(Oid dboid, TimestampTz timer)
{
	Latch	   *latches[ORCH_MAX_WORKERS_PER_DB * 4];
	int			n = 0;

	SpinLockAcquire(&OrchShared->mutex);
	for (int i = 0; i < OrchShared->nslots && n < (int) lengthof(latches); i++)
	{
		OrchEngineSlot *slot = &OrchShared->slots[i];

		if (slot->state != ORCH_SLOT_RUNNING || slot->dboid != dboid ||
			slot->latch == NULL || slot->pid == MyProcPid)
			continue;
		if (slot->sleep_until == 0)
		{
			if (slot->wake_by == 0 || timer < slot->wake_by)
				slot->wake_by = timer;
		}
		else if (slot->sleep_until > timer)
			latches[n++] = slot->latch;
	}
	SpinLockRelease(&OrchShared->mutex);

	for (int i = 0; i < n; i++)
		SetLatch(latches[i]);
}

/* A new timer (a lease's expiry) at the end of this transaction. */
void
orch_wake_engines_for_timer_at_end(TimestampTz timer)
{
	if (new_timer_at == 0 || timer < new_timer_at)
		new_timer_at = timer;
}

/* Runs may finish, or tasks be queued, when this transaction commits. */
void
orch_broadcast_runs_at_end(void)
{
	broadcast_runs_at_commit = true;
}

/*
 * The engine's slot tells committers when it will next wake on its own (0:
 * it is busy).  Going to sleep, it takes in the timers committed while it was
 * busy and returns when it must wake, at the latest.
 */
TimestampTz
orch_engine_sleeping(int slotno, TimestampTz until)
{
	OrchEngineSlot *slot = &OrchShared->slots[slotno];

	SpinLockAcquire(&OrchShared->mutex);
	if (until != 0 && slot->wake_by != 0)
	{
		if (slot->wake_by < until)
			until = slot->wake_by;
		slot->wake_by = 0;
	}
	slot->sleep_until = until;
	SpinLockRelease(&OrchShared->mutex);
	return until;
}

void
orch_wake_engines(Oid dboid)
{
	Latch	   *latches[ORCH_MAX_WORKERS_PER_DB * 4];
	int			n = 0;

	if (OrchShared == NULL)
		return;

	/* SetLatch may make a system call: collect under the lock, set outside */
	SpinLockAcquire(&OrchShared->mutex);
	for (int i = 0; i < OrchShared->nslots && n < (int) lengthof(latches); i++)
	{
		OrchEngineSlot *slot = &OrchShared->slots[i];

		if (slot->state == ORCH_SLOT_RUNNING && slot->dboid == dboid &&
			slot->latch != NULL && slot->pid != MyProcPid)
			latches[n++] = slot->latch;
	}
	SpinLockRelease(&OrchShared->mutex);

	for (int i = 0; i < n; i++)
		SetLatch(latches[i]);
}

/*
 * Set the launcher's latch.  look_again: ask it to look at the databases
 * again (a CREATE EXTENSION or CREATE DATABASE committed), which also
 * probes at once those it found without the extension; without it, the
 * launcher only looks at its workers (an engine worker that found its
 * extension, so that the database's sealer is started).
 */
void
orch_wake_launcher(bool look_again)
{
	Latch	   *latch;

	if (OrchShared == NULL)
		return;
	SpinLockAcquire(&OrchShared->mutex);
	if (look_again)
		OrchShared->launcher_wakeups++;
	latch = OrchShared->launcher_latch;
	SpinLockRelease(&OrchShared->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

PG_FUNCTION_INFO_V1(orch_wake_at_end);
Datum
orch_wake_at_end(PG_FUNCTION_ARGS)
{
	orch_wake_engines_at_end();
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(orch_launcher_wake_on_commit);
Datum
orch_launcher_wake_on_commit(PG_FUNCTION_ARGS)
{
	if (OrchShared == NULL)
		ereport(WARNING,
				(errmsg("orchestrator is not loaded through shared_preload_libraries"),
				 errdetail("No engine worker will advance runs in this cluster; orch.tick() still does."),
				 errhint("Add orchestrator to shared_preload_libraries and restart the server.")));
	wake_launcher_at_commit = true;
	PG_RETURN_VOID();
}
