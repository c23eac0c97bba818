/*-------------------------------------------------------------------------
 * uuid_v7.c
 *	  orch._uuid_v7(): the identifiers of runs, UUID version 7 (RFC 9562);
 *	  and the lease tokens of tasks (below).
 *
 *	  The first 48 bits are the Unix time in milliseconds and the next 12
 *	  (after the version) the fraction of that millisecond, so identifiers
 *	  made later sort later, and within one backend they strictly increase
 *	  even if the clock steps back.  The remaining 62 bits are random.
 *
 *	  Time order is what makes them cheap to index: the runs' primary key
 *	  and every index on run_id (the steps', the attempts', the audit
 *	  trail's) take new entries near their right edge, in pages that are
 *	  already in memory, where random version 4 identifiers would touch a
 *	  random leaf page each.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "orchestrator.h"

/* Unix time in 1/4096 ms steps (ms in the high bits) of the last identifier. */
static uint64 last_ticks = 0;

PG_FUNCTION_INFO_V1(orch_uuid_v7);
Datum
orch_uuid_v7(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *uuid = palloc(UUID_LEN);
	TimestampTz now = GetCurrentTimestamp();
	int64		unix_us;
	uint64		ticks;
	uint64		ms;
	uint32		fraction;

	unix_us = now + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
	if (unix_us < 0)
		unix_us = 0;
	ticks = ((uint64) unix_us / 1000) << 12 | (((uint64) unix_us % 1000) * 4096 / 1000);
	if (ticks <= last_ticks)
		ticks = last_ticks + 1;
	last_ticks = ticks;
	ms = ticks >> 12;
	fraction = (uint32) (ticks & 0xFFF);

	if (!pg_strong_random(&uuid->data[8], UUID_LEN - 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values for a run identifier")));

	for (int i = 0; i < 6; i++)
		uuid->data[i] = (unsigned char) (ms >> (8 * (5 - i)));
	uuid->data[6] = (unsigned char) (0x70 | (fraction >> 8));
	uuid->data[7] = (unsigned char) (fraction & 0xFF);
	uuid->data[8] = (unsigned char) (0x80 | (uuid->data[8] & 0x3F));

	PG_RETURN_UUID_P(uuid);
}

/*
 * Lease tokens: UUID version 8 (RFC 9562's custom layout).  The last 62
 * bits are the leased step's id, the first 60 (around the version) random:
 * a verdict finds its task by the step's primary key and then compares the
 * whole token, so the steps need no index of their tokens, which every
 * claim would write to.  The step's id is no secret (the traceparent a
 * worker is handed carries it too); the random bits are what a token's
 * holder proves it holds, and a new claim of the step draws new ones.
 */
#define LEASE_STEP_MASK		((UINT64CONST(1) << 62) - 1)

/* A new lease token for the step. */
Datum
orch_lease_token_make(int64 step_id)
{
	pg_uuid_t  *uuid = palloc(UUID_LEN);
	uint64		id = (uint64) step_id;

	if (step_id <= 0 || (id & ~LEASE_STEP_MASK) != 0)
		elog(ERROR, "step id " INT64_FORMAT " does not fit a lease token", step_id);
	if (!pg_strong_random(uuid->data, 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values for a lease token")));
	uuid->data[6] = (unsigned char) (0x80 | (uuid->data[6] & 0x0F));
	for (int i = 0; i < 8; i++)
		uuid->data[8 + i] = (unsigned char) (id >> (8 * (7 - i)));
	uuid->data[8] = (unsigned char) (0x80 | (uuid->data[8] & 0x3F));
	return UUIDPGetDatum(uuid);
}

/* The step a lease token names; false if it is not a lease token. */
bool
orch_lease_token_step(Datum token, int64 *step_id)
{
	const unsigned char *d = DatumGetUUIDP(token)->data;
	uint64		id = 0;

	if ((d[6] & 0xF0) != 0x80 || (d[8] & 0xC0) != 0x80)
		return false;
	for (int i = 0; i < 8; i++)
		id = id << 8 | d[8 + i];
	id &= LEASE_STEP_MASK;
	if (id == 0)
		return false;
	*step_id = (int64) id;
	return true;
}

/* orch._lease_token(step_id) */
PG_FUNCTION_INFO_V1(orch_lease_token);
Datum
orch_lease_token(PG_FUNCTION_ARGS)
{
	return orch_lease_token_make(PG_GETARG_INT64(0));
}

/* orch._lease_step(token): the step it names, NULL if it is not a lease token */
PG_FUNCTION_INFO_V1(orch_lease_step);
Datum
orch_lease_step(PG_FUNCTION_ARGS)
{
	int64		step_id;

	if (!orch_lease_token_step(PG_GETARG_DATUM(0), &step_id))
		PG_RETURN_NULL();
	PG_RETURN_INT64(step_id);
}
