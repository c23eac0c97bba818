/*-------------------------------------------------------------------------
 * launcher.c
 *	  The launcher: one static background worker per cluster that starts
 *	  engine workers (orchestrator.workers_per_database) and a sealer for
 *	  every database that has the extension, and starts them again when
 *	  they exit.
 *
 *	  The launcher connects to no database; it reads pg_database and starts
 *	  a worker for each connectable, non-template database it has not yet
 *	  found to lack the extension.  The worker itself checks for the extension
 *	  and, when it is absent, says so in its slot and exits; the launcher
 *	  looks again after orchestrator.launcher_naptime, or at once when
 *	  CREATE EXTENSION or CREATE DATABASE commits and wakes it.  The sealer
 *	  is started once the database's first engine worker has found the
 *	  extension (it pokes the launcher), so that a database without it costs
 *	  one worker per look, not two.
 *
 *	  Like every worker it starts only after recovery has finished, so
 *	  nothing acts on a standby; after a crash the postmaster restarts it.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "orchestrator.h"

/* how long after an unexpected exit an engine worker is started again */
#define ENGINE_RESTART_DELAY_MS		1000
/* how long after a DROP DATABASE request a database's workers stay away */
#define ENGINE_STOP_DELAY_MS		10000

typedef struct EngineRef
{
	BackgroundWorkerHandle *handle;
	int			slotno;
	TimestampTz start_after;
	uint64		started_at_wakeup;	/* launcher_wakeups when it was started */
} EngineRef;

typedef struct DatabaseEntry
{
	Oid			dboid;			/* hash key */
	bool		seen;			/* still in pg_database at the last scan */
	bool		no_extension;	/* a worker found no extension there */
	TimestampTz probe_after;	/* when to look for the extension again */
	char		datname[NAMEDATALEN];
	EngineRef	engines[ORCH_MAX_WORKERS_PER_DB + 1];	/* the last: its sealer */
} DatabaseEntry;

static HTAB *databases = NULL;

/* the launcher_wakeups value that the current pass is answering */
static uint64 wakeups_seen = 0;

void
orch_launcher_register(void)
{
	BackgroundWorker bgw;

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = 5;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, ORCH_EXTENSION_NAME);
	snprintf(bgw.bgw_function_name, BGW_MAXLEN, "orch_launcher_main");
	snprintf(bgw.bgw_name, BGW_MAXLEN, "orchestrator launcher");
	snprintf(bgw.bgw_type, BGW_MAXLEN, "orchestrator launcher");
	RegisterBackgroundWorker(&bgw);
}

static void
launcher_detach(int code, Datum arg)
{
	SpinLockAcquire(&OrchShared->mutex);
	if (OrchShared->launcher_pid == MyProcPid)
	{
		OrchShared->launcher_pid = 0;
		OrchShared->launcher_latch = NULL;
	}
	SpinLockRelease(&OrchShared->mutex);
}

/*
 * A previous launcher that exited on an error left its engine workers
 * running, but their handles went with it: ask them to exit and take the
 * slots back, so that every worker is again one this launcher watches.
 */
static void
adopt_orphans(void)
{
	for (int tries = 0; tries < 100; tries++)
	{
		bool		busy = false;

		SpinLockAcquire(&OrchShared->mutex);
		for (int i = 0; i < OrchShared->nslots; i++)
		{
			OrchEngineSlot *slot = &OrchShared->slots[i];

			if (slot->state == ORCH_SLOT_FREE)
				continue;
			if (slot->pid != 0 && (slot->state == ORCH_SLOT_RUNNING ||
								   slot->state == ORCH_SLOT_STARTING))
			{
				kill(slot->pid, SIGTERM);
				busy = true;
			}
			else if (slot->state == ORCH_SLOT_STARTING && tries < 20)
				busy = true;	/* may still attach; give it a moment */
			else
				memset(slot, 0, sizeof(*slot));
		}
		SpinLockRelease(&OrchShared->mutex);
		if (!busy)
			return;
		(void) WaitLatch(MyLatch, WL_TIMEOUT | WL_LATCH_SET | WL_EXIT_ON_PM_DEATH,
						 100L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* Mark every database as unseen, then mark those in pg_database seen. */
static void
scan_databases(void)
{
	HASH_SEQ_STATUS seq;
	DatabaseEntry *entry;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	hash_seq_init(&seq, databases);
	while ((entry = hash_seq_search(&seq)) != NULL)
		entry->seen = false;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "orchestrator launcher: scanning pg_database");

	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);
		bool		found;

		/*
		 * Templates are skipped: a connected worker would make CREATE
		 * DATABASE from them fail.
		 */
		if (!db->datallowconn || db->datistemplate)
			continue;
		entry = hash_search(databases, &db->oid, HASH_ENTER, &found);
		if (!found)
		{
			memset(((char *) entry) + sizeof(Oid), 0, sizeof(DatabaseEntry) - sizeof(Oid));
			for (int i = 0; i <= ORCH_SEALER_INDEX; i++)
				entry->engines[i].slotno = -1;
		}
		entry->seen = true;
		strlcpy(entry->datname, NameStr(db->datname), NAMEDATALEN);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);

	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * A worker (engine worker index, or the sealer) could not be started, for
 * want of a slot of ours (no_slot) or of a background worker slot: say so,
 * and try again after orchestrator.launcher_naptime.
 */
static void
not_started(DatabaseEntry *entry, int index, bool no_slot)
{
	const char *db = entry->datname;

	if (index == ORCH_SEALER_INDEX && no_slot)
		ereport(WARNING,
				(errmsg("orchestrator launcher has no free slot for the sealer of database \"%s\"", db),
				 errhint("Raise max_worker_processes.")));
	else if (index == ORCH_SEALER_INDEX)
		ereport(WARNING,
				(errmsg("orchestrator launcher could not start the sealer for database \"%s\"", db),
				 errhint("Raise max_worker_processes.")));
	else if (no_slot)
		ereport(WARNING,
				(errmsg("orchestrator launcher has no free slot for an engine worker of database \"%s\"", db),
				 errhint("Raise max_worker_processes.")));
	else
		ereport(WARNING,
				(errmsg("orchestrator launcher could not start an engine worker for database \"%s\"", db),
				 errhint("Raise max_worker_processes.")));
	entry->engines[index].start_after =
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), orch_launcher_naptime_s * 1000);
}

static void
start_engine(DatabaseEntry *entry, int index)
{
	BackgroundWorker bgw;
	EngineRef  *ref = &entry->engines[index];
	int			slotno;

	slotno = orch_slot_reserve(entry->dboid, index);
	if (slotno < 0)
	{
		not_started(entry, index, true);
		return;
	}

	memset(&bgw, 0, sizeof(bgw));
	bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	bgw.bgw_start_time = BgWorkerStart_RecoveryFinished;
	bgw.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(bgw.bgw_library_name, BGW_MAXLEN, ORCH_EXTENSION_NAME);
	if (index == ORCH_SEALER_INDEX)
	{
		snprintf(bgw.bgw_function_name, BGW_MAXLEN, "orch_sealer_main");
		snprintf(bgw.bgw_name, BGW_MAXLEN, "orchestrator sealer for database \"%s\"",
				 entry->datname);
		snprintf(bgw.bgw_type, BGW_MAXLEN, "orchestrator sealer");
	}
	else
	{
		snprintf(bgw.bgw_function_name, BGW_MAXLEN, "orch_engine_main");
		snprintf(bgw.bgw_name, BGW_MAXLEN, "orchestrator engine %d for database \"%s\"",
				 index, entry->datname);
		snprintf(bgw.bgw_type, BGW_MAXLEN, "orchestrator engine");
	}
	bgw.bgw_main_arg = Int32GetDatum(slotno);
	bgw.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&bgw, &ref->handle))
	{
		orch_slot_free(slotno);
		ref->handle = NULL;
		not_started(entry, index, false);
		return;
	}
	ref->slotno = slotno;
	ref->started_at_wakeup = wakeups_seen;
}

/* Notice engine workers that have exited, and why. */
static void
reap_engine(DatabaseEntry *entry, int index, TimestampTz now)
{
	EngineRef  *ref = &entry->engines[index];
	pid_t		pid;
	bool		stop_requested;
	OrchSlotState state;

	if (ref->handle == NULL)
		return;
	if (GetBackgroundWorkerPid(ref->handle, &pid) != BGWH_STOPPED)
		return;

	state = orch_slot_state(ref->slotno, &stop_requested);
	if (state == ORCH_SLOT_NO_EXTENSION && ref->started_at_wakeup != wakeups_seen)
	{
		/*
		 * A CREATE EXTENSION may have committed after the worker looked:
		 * someone asked us to look again since it was started.
		 */
		ref->start_after = now;
	}
	else if (state == ORCH_SLOT_NO_EXTENSION)
	{
		entry->no_extension = true;
		entry->probe_after = TimestampTzPlusMilliseconds(now, orch_launcher_naptime_s * 1000);
	}
	else if (stop_requested)
		ref->start_after = TimestampTzPlusMilliseconds(now, ENGINE_STOP_DELAY_MS);
	else
		ref->start_after = TimestampTzPlusMilliseconds(now, ENGINE_RESTART_DELAY_MS);

	orch_slot_free(ref->slotno);
	pfree(ref->handle);
	ref->handle = NULL;
	ref->slotno = -1;
}

/* The database's first engine worker is running: it found the extension. */
static bool
extension_found(DatabaseEntry *entry)
{
	EngineRef  *first = &entry->engines[0];
	bool		stop_requested;

	return first->handle != NULL &&
		orch_slot_state(first->slotno, &stop_requested) == ORCH_SLOT_RUNNING &&
		!stop_requested;
}

static void
stop_engine(EngineRef *ref)
{
	if (ref->handle == NULL)
		return;
	TerminateBackgroundWorker(ref->handle);
}

void
orch_launcher_main(Datum main_arg)
{
	HASHCTL		ctl;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* no database: pg_database is a shared catalog */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("orchestrator launcher");

	SpinLockAcquire(&OrchShared->mutex);
	OrchShared->launcher_pid = MyProcPid;
	OrchShared->launcher_latch = MyLatch;
	SpinLockRelease(&OrchShared->mutex);
	before_shmem_exit(launcher_detach, (Datum) 0);

	adopt_orphans();

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(DatabaseEntry);
	databases = hash_create("orchestrator databases", 64, &ctl, HASH_ELEM | HASH_BLOBS);

	ereport(LOG, (errmsg("orchestrator launcher started")));

	for (;;)
	{
		HASH_SEQ_STATUS seq;
		DatabaseEntry *entry;
		TimestampTz now;
		TimestampTz next_event;
		bool		rescan;
		long		timeout_ms;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		SpinLockAcquire(&OrchShared->mutex);
		rescan = (OrchShared->launcher_wakeups != wakeups_seen);
		wakeups_seen = OrchShared->launcher_wakeups;
		SpinLockRelease(&OrchShared->mutex);

		scan_databases();

		now = GetCurrentTimestamp();
		next_event = TimestampTzPlusMilliseconds(now, orch_launcher_naptime_s * 1000);

		hash_seq_init(&seq, databases);
		while ((entry = hash_seq_search(&seq)) != NULL)
		{
			for (int i = 0; i <= ORCH_SEALER_INDEX; i++)
				reap_engine(entry, i, now);

			if (!entry->seen)
			{
				/* dropped, or became a template: its workers have gone or go now */
				bool		any = false;

				for (int i = 0; i <= ORCH_SEALER_INDEX; i++)
				{
					stop_engine(&entry->engines[i]);
					any |= entry->engines[i].handle != NULL;
				}
				if (!any)
					hash_search(databases, &entry->dboid, HASH_REMOVE, NULL);
				continue;
			}

			if (entry->no_extension)
			{
				if (!rescan && now < entry->probe_after)
				{
					next_event = Min(next_event, entry->probe_after);
					continue;
				}
				entry->no_extension = false;
			}

			for (int i = 0; i <= ORCH_SEALER_INDEX; i++)
			{
				EngineRef  *ref = &entry->engines[i];

				if (i >= orch_workers_per_database && i != ORCH_SEALER_INDEX)
				{
					stop_engine(ref);
					continue;
				}
				if (ref->handle != NULL)
					continue;
				/* the sealer: once engine 0 has found the extension */
				if (i == ORCH_SEALER_INDEX && !extension_found(entry))
					continue;
				if (now < ref->start_after)
				{
					next_event = Min(next_event, ref->start_after);
					continue;
				}
				start_engine(entry, i);
			}
		}

		timeout_ms = (long) ((next_event - GetCurrentTimestamp()) / 1000);
		if (timeout_ms < 10)
			timeout_ms = 10;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
