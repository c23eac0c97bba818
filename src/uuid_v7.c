/*-------------------------------------------------------------------------
 * uuid_v7.c
 *	  orch._uuid_v7(): the identifiers of runs, UUID version 7 (RFC 9562).
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
