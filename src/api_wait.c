/*-------------------------------------------------------------------------
 * api_wait.c
 *	  orch.wait_run(run_id, timeout): block until a run has finished, and
 *	  the compensations that its end started have run, or until it waits
 *	  for a person (needs_human, needs_approval).
 *
 *	  The caller sleeps on a condition variable in shared memory that is
 *	  broadcast after every commit that may have finished a run (an engine
 *	  batch, cancel_run, orch.tick), and looks at the run again with a new
 *	  snapshot each time it wakes.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "orchestrator.h"

static bool
is_final(const char *status)
{
	return strcmp(status, "succeeded") == 0 || strcmp(status, "failed") == 0 ||
		strcmp(status, "cancelled") == 0 || strcmp(status, "timed_out") == 0;
}

PG_FUNCTION_INFO_V1(orch_wait_run);
Datum
orch_wait_run(PG_FUNCTION_ARGS)
{
	Datum		run_id = PG_GETARG_DATUM(0);
	Interval   *timeout = PG_GETARG_INTERVAL_P(1);
	int64		timeout_us;
	TimestampTz deadline;
	char	   *status = NULL;
	SPIPlanPtr	plan;
	MemoryContext caller_cxt;
	Oid			argtypes[1] = {UUIDOID};

	if (OrchShared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("orch.wait_run needs orchestrator in shared_preload_libraries")));
	if (IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("orch.wait_run cannot wait inside a REPEATABLE READ or SERIALIZABLE transaction"),
				 errdetail("Its snapshot would never show the run finishing.")));

	timeout_us = timeout->time + (int64) timeout->day * USECS_PER_DAY +
		(int64) timeout->month * DAYS_PER_MONTH * USECS_PER_DAY;
	deadline = GetCurrentTimestamp() + Max(timeout_us, 0);

	caller_cxt = CurrentMemoryContext;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	plan = SPI_prepare("SELECT r.status, r.xmin,"
					   "       EXISTS (SELECT FROM orch.steps s"
					   "                WHERE s.run_id = r.run_id AND s.phase = 'compensate'"
					   "                  AND s.status IN ('ready', 'retrying'))"
					   "  FROM orch.runs r WHERE r.run_id = $1", 1, argtypes);
	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));

	for (;;)
	{
		long		remaining_ms;
		bool		isnull;
		bool		done;

		/* on the wait list before looking, so no broadcast is missed */
		ConditionVariablePrepareToSleep(&OrchShared->run_finished);

		/* not read-only: each execution takes a new snapshot */
		if (SPI_execute_plan(plan, &run_id, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "could not read run status");
		if (SPI_processed == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("run %s does not exist",
							DatumGetCString(DirectFunctionCall1(uuid_out, run_id)))));
		status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		done = (is_final(status) &&
				!DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3,
											&isnull))) ||
			strcmp(status, "needs_human") == 0 || strcmp(status, "needs_approval") == 0;
		if (!done)
		{			TransactionId xmin = DatumGetTransactionId(SPI_getbinval(SPI_tuptable->vals[0],
																	 SPI_tuptable->tupdesc, 2,
																	 &isnull));

			/* the engine cannot see what this transaction has not committed */
			if (TransactionIdIsCurrentTransactionId(xmin))
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
						 errmsg("run %s was started or changed by the current transaction",
								DatumGetCString(DirectFunctionCall1(uuid_out, run_id))),
						 errdetail("The engine sees the run only after the transaction commits, so waiting here would never end."),
						 errhint("Commit first: call orch.start_run and orch.wait_run in separate transactions.")));
		}
		SPI_freetuptable(SPI_tuptable);
		if (done)
			break;

		remaining_ms = (long) ((deadline - GetCurrentTimestamp()) / 1000);
		if (remaining_ms <= 0)
			break;
		/* as in orch.claim_tasks: a latch reset while we looked is not lost */
		SetLatch(MyLatch);
		(void) ConditionVariableTimedSleep(&OrchShared->run_finished, remaining_ms,
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();

	status = MemoryContextStrdup(caller_cxt, status);	/* SPI_finish frees SPI memory */
	SPI_finish();
	PG_RETURN_TEXT_P(cstring_to_text(status));
}
