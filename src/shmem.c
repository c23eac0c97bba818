/*-------------------------------------------------------------------------
 * shmem.c
 *	  The shared state of the launcher and the engine workers: one slot per
 *	  possible worker, the launcher's latch, and the condition variable that
 *	  orch.wait_run() sleeps on.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"

#include "orchestrator.h"

OrchSharedState *OrchShared = NULL;

static Size
orch_shmem_size(void)
{
	return add_size(offsetof(OrchSharedState, slots),
					mul_size(max_worker_processes, sizeof(OrchEngineSlot)));
}

void
orch_shmem_request(void)
{
	RequestAddinShmemSpace(orch_shmem_size());
}

void
orch_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	OrchShared = ShmemInitStruct("orchestrator", orch_shmem_size(), &found);
	if (!found)
	{
		memset(OrchShared, 0, orch_shmem_size());
		SpinLockInit(&OrchShared->mutex);
		SpinLockInit(&OrchShared->frontiers_lock);
		ConditionVariableInit(&OrchShared->run_finished);
		ConditionVariableInit(&OrchShared->tasks_ready);
		OrchShared->nslots = max_worker_processes;
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Take a free slot for a worker the launcher is about to start; -1 if none. */
int
orch_slot_reserve(Oid dboid, int worker_index)
{
	int			slotno = -1;

	SpinLockAcquire(&OrchShared->mutex);
	for (int i = 0; i < OrchShared->nslots; i++)
	{
		OrchEngineSlot *slot = &OrchShared->slots[i];

		if (slot->state == ORCH_SLOT_FREE)
		{
			memset(slot, 0, sizeof(*slot));
			slot->state = ORCH_SLOT_STARTING;
			slot->dboid = dboid;
			slot->worker_index = worker_index;
			slotno = i;
			break;
		}
	}
	SpinLockRelease(&OrchShared->mutex);
	return slotno;
}

void
orch_slot_free(int slotno)
{
	SpinLockAcquire(&OrchShared->mutex);
	memset(&OrchShared->slots[slotno], 0, sizeof(OrchEngineSlot));
	SpinLockRelease(&OrchShared->mutex);
}

OrchSlotState
orch_slot_state(int slotno, bool *stop_requested)
{
	OrchSlotState state;

	SpinLockAcquire(&OrchShared->mutex);
	state = OrchShared->slots[slotno].state;
	if (stop_requested)
		*stop_requested = OrchShared->slots[slotno].stop_requested;
	SpinLockRelease(&OrchShared->mutex);
	return state;
}

/* Ask every engine worker of a database to exit (SIGTERM). */
void
orch_stop_engines_for_database(Oid dboid)
{
	pid_t		pids[ORCH_MAX_WORKERS_PER_DB * 4];
	int			npids = 0;

	SpinLockAcquire(&OrchShared->mutex);
	for (int i = 0; i < OrchShared->nslots; i++)
	{
		OrchEngineSlot *slot = &OrchShared->slots[i];

		if (slot->state != ORCH_SLOT_FREE && slot->dboid == dboid)
		{
			slot->stop_requested = true;
			if (slot->pid != 0 && npids < (int) lengthof(pids))
				pids[npids++] = slot->pid;
		}
	}
	SpinLockRelease(&OrchShared->mutex);

	for (int i = 0; i < npids; i++)
		kill(pids[i], SIGTERM);
}

/*
 * orch._engine_workers(): the running engine workers (not the sealers), for
 * the view orch.engine_workers.
 */
PG_FUNCTION_INFO_V1(orch_engine_workers);
Datum
orch_engine_workers(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	if (OrchShared == NULL)
		return (Datum) 0;

	for (int i = 0; i < OrchShared->nslots; i++)
	{
		OrchEngineSlot slot;
		Datum		values[5];
		bool		nulls[5] = {0};

		SpinLockAcquire(&OrchShared->mutex);
		slot = OrchShared->slots[i];
		SpinLockRelease(&OrchShared->mutex);

		if (slot.state != ORCH_SLOT_RUNNING || slot.worker_index == ORCH_SEALER_INDEX)
			continue;
		values[0] = ObjectIdGetDatum(slot.dboid);
		values[1] = Int32GetDatum(slot.pid);
		values[2] = TimestampTzGetDatum(slot.started_at);
		values[3] = TimestampTzGetDatum(slot.last_batch_at);
		nulls[3] = (slot.last_batch_at == 0);
		values[4] = Int64GetDatum((int64) slot.steps_done);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
