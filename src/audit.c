/*-------------------------------------------------------------------------
 * audit.c
 *	  The audit trail: the trigger that records row changes in
 *	  orch.audit_log, the canonical encoding and hash of an audit row, and
 *	  the refusal of anything but appending to the audit tables.
 *
 *	  A change is recorded by a statement-level AFTER trigger that reads the
 *	  statement's transition tables; the events of a transaction wait in
 *	  the backend's memory and are written as one record of
 *	  orch.audit_records when it commits.  Each event carries the SHA-256
 *	  of its canonical encoding (docs/audit.md), which depends on nothing
 *	  but the row's values: not on settings, not on how jsonb prints.  The
 *	  write path locks no shared row; audit_seal.c chains finished events
 *	  into blocks afterwards.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <lz4.h>

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/toast_compression.h"
#include "access/toast_internals.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_enum.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "common/sha2.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "port/pg_bswap.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/catcache.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"
#include "utils/xid8.h"

#include "orchestrator.h"
#include "audit.h"

#include <openssl/sha.h>

/* settings: the application's actor and reason, usually transaction-local */
char	   *orch_audit_actor = NULL;
char	   *orch_audit_reason = NULL;

/* the step whose function is running in this backend, if any */
static bool step_context_set = false;
static pg_uuid_t step_context_run;
static int64 step_context_step;

/* set only while orch.purge_audit removes sealed ranges */
bool		orch_audit_purging = false;

/*
 * A record is full once its events reach this size, or
 * ORCH_AUDIT_RECORD_EVENTS of them: its row images are held in memory
 * until it is written, and copied once more when compressed.
 */
#define AUDIT_RECORD_BYTES	(8 * 1024 * 1024)

/*
 * Events of a record at least this long are compressed before the row is
 * formed (events_compress); below it a compressed datum's header and the
 * codec's own overhead leave little to save.
 */
#define AUDIT_COMPRESS_MIN	256

void
orch_audit_set_step(Datum run_id, int64 step_id)
{
	memcpy(&step_context_run, DatumGetUUIDP(run_id), sizeof(pg_uuid_t));
	step_context_step = step_id;
	step_context_set = true;
}

void
orch_audit_clear_step(void)
{
	step_context_set = false;
}

/* ------------------------------------------------------------------------
 * Canonical encoding (docs/audit.md)
 * ------------------------------------------------------------------------ */

/*
 * The encoding is written with these rather than appendStringInfo*: a row
 * is dozens of small appends, and they check for room inline.  The
 * buffer is not kept NUL-terminated; it is hashed by its length.
 */
static inline void
reserve(StringInfo buf, int n)
{
	if (buf->len + n >= buf->maxlen)
		enlargeStringInfo(buf, n);
}

static inline void
put_byte(StringInfo buf, char c)
{
	reserve(buf, 1);
	buf->data[buf->len++] = c;
}

static inline void
put_raw(StringInfo buf, const char *data, int len)
{
	reserve(buf, len);
	memcpy(buf->data + buf->len, data, len);
	buf->len += len;
}

static inline void
put_u32(StringInfo buf, uint32 v)
{
	unsigned char *p;

	reserve(buf, 4);
	p = (unsigned char *) buf->data + buf->len;
	p[0] = (unsigned char) (v >> 24);
	p[1] = (unsigned char) (v >> 16);
	p[2] = (unsigned char) (v >> 8);
	p[3] = (unsigned char) v;
	buf->len += 4;
}

/* Overwrite the 4 bytes at offset at with v, big-endian. */
static void
patch_u32(StringInfo buf, int at, uint32 v)
{
	unsigned char *p = (unsigned char *) buf->data + at;

	p[0] = (unsigned char) (v >> 24);
	p[1] = (unsigned char) (v >> 16);
	p[2] = (unsigned char) (v >> 8);
	p[3] = (unsigned char) v;
}

static void
put_u64(StringInfo buf, uint64 v)
{
	put_u32(buf, (uint32) (v >> 32));
	put_u32(buf, (uint32) v);
}

/* A field's head: 0x01, its length (4 bytes, big-endian); its bytes follow. */
static void
enc_field_head(StringInfo buf, uint32 len)
{
	put_byte(buf, 1);
	put_u32(buf, len);
}

/* A field: 0x01, its length (4 bytes, big-endian), its bytes. */
static void
enc_bytes(StringInfo buf, const void *data, uint32 len)
{
	enc_field_head(buf, len);
	put_raw(buf, data, (int) len);
}

/* A NULL field: 0x00 alone. */
static void
enc_null(StringInfo buf)
{
	put_byte(buf, 0);
}

static void
enc_u64(StringInfo buf, uint64 v)
{
	enc_field_head(buf, 8);
	put_u64(buf, v);
}

/*
 * Text in UTF-8, as the encoding takes it, whatever the database's encoding
 * (in a SQL_ASCII database, the bytes as stored).  Returns s itself when it
 * needs no conversion.
 */
static const char *
utf8(const char *s, int len, int *outlen)
{
	char	   *c;

	if (GetDatabaseEncoding() == PG_UTF8 || GetDatabaseEncoding() == PG_SQL_ASCII)
	{
		*outlen = len;
		return s;
	}
	c = pg_server_to_any(s, len, PG_UTF8);
	*outlen = c == s ? len : (int) strlen(c);
	return c;
}

static void
enc_cstring(StringInfo buf, const char *s)
{
	int			len;
	const char *u;

	if (s == NULL)
	{
		enc_null(buf);
		return;
	}
	u = utf8(s, (int) strlen(s), &len);
	enc_bytes(buf, u, (uint32) len);
}

/* A length (4 bytes) and the UTF-8 bytes of a string of the database. */
static void
put_string(StringInfo out, const char *s, int len)
{
	int			ulen;
	const char *u = utf8(s, len, &ulen);

	put_u32(out, (uint32) ulen);
	put_raw(out, u, ulen);
}

/* A JSON number: 'N', then its text as numeric_out writes it. */
static void
put_number(StringInfo out, Numeric num)
{
	char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(num)));
	int			len = (int) strlen(s);

	put_byte(out, 'N');
	put_u32(out, (uint32) len);
	put_raw(out, s, len);
	pfree(s);
}

static void json_canon(StringInfo out, const JsonbContainer *jc);

/*
 * One key's value or one element: a tag byte, then for strings and numbers
 * a length and bytes; or a container.
 */
static void
json_entry(StringInfo out, JEntry entry, const char *base, uint32 offset, uint32 len)
{
	switch (entry & JENTRY_TYPEMASK)
	{
		case JENTRY_ISNULL:
			put_byte(out, 'Z');
			break;
		case JENTRY_ISBOOL_FALSE:
			put_byte(out, 'F');
			break;
		case JENTRY_ISBOOL_TRUE:
			put_byte(out, 'T');
			break;
		case JENTRY_ISSTRING:
			put_byte(out, 'S');
			put_string(out, base + offset, (int) len);
			break;
		case JENTRY_ISNUMERIC:
			put_number(out, (Numeric) (base + INTALIGN(offset)));
			break;
		case JENTRY_ISCONTAINER:
			json_canon(out, (const JsonbContainer *) (base + INTALIGN(offset)));
			break;
		default:
			elog(ERROR, "unexpected jsonb entry type %u in an audit row",
				 (unsigned) (entry & JENTRY_TYPEMASK));
	}
}

/*
 * A jsonb container in canonical form: objects as 'O', their number of keys
 * and each key (length, bytes) with its value, in jsonb's key order (shorter
 * keys first, then bytewise); arrays as 'A', their length and elements; a
 * raw scalar as the scalar alone.
 *
 * The container is read in its binary form (utils/jsonb.h): a header with
 * the count and kind, one JEntry per key and value (an object's keys first,
 * then its values), then their data.  A JEntry holds the length of its datum
 * or, every JB_OFFSET_STRIDE entries, its end offset; numbers and nested
 * containers start at an int-aligned offset.  Walking it directly spares
 * JsonbIterator's copy of every value.
 */
static void
json_canon(StringInfo out, const JsonbContainer *jc)
{
	uint32		count = jc->header & JB_CMASK;
	bool		is_object = (jc->header & JB_FOBJECT) != 0;
	uint32		nentries = is_object ? count * 2 : count;
	const char *base = (const char *) &jc->children[nentries];
	uint32		local[65];
	uint32	   *offs = nentries < lengthof(local) ? local : palloc(sizeof(uint32) * (nentries + 1));

	/* where each entry's datum starts; offs[nentries] is the end */
	offs[0] = 0;
	for (uint32 i = 0; i < nentries; i++)
	{
		JEntry		entry = jc->children[i];

		offs[i + 1] = JBE_HAS_OFF(entry) ? JBE_OFFLENFLD(entry) : offs[i] + JBE_OFFLENFLD(entry);
	}

	if (is_object)
	{
		put_byte(out, 'O');
		put_u32(out, count);
		for (uint32 i = 0; i < count; i++)
		{
			uint32		v = count + i;

			put_string(out, base + offs[i], (int) (offs[i + 1] - offs[i]));
			json_entry(out, jc->children[v], base, offs[v], offs[v + 1] - offs[v]);
		}
	}
	else
	{
		if (!(jc->header & JB_FSCALAR))
		{
			put_byte(out, 'A');
			put_u32(out, count);
		}
		for (uint32 i = 0; i < count; i++)
			json_entry(out, jc->children[i], base, offs[i], offs[i + 1] - offs[i]);
	}
	if (offs != local)
		pfree(offs);
}

/* A jsonb field: its canonical form, length-prefixed like any field. */
static void
enc_jsonb(StringInfo buf, Jsonb *jb)
{
	int			len_at;
	uint32		len;

	if (jb == NULL)
	{
		enc_null(buf);
		return;
	}
	put_byte(buf, 1);
	len_at = buf->len;
	put_u32(buf, 0);			/* the length, filled in below */
	json_canon(buf, &jb->root);
	len = (uint32) (buf->len - len_at - 4);
	patch_u32(buf, len_at, len);
}

/* Microseconds since 1970-01-01 00:00 UTC. */
static int64
unix_usecs(TimestampTz t)
{
	return t + (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
}

/* The timestamp of microseconds since 1970-01-01 00:00 UTC. */
static TimestampTz
from_unix_usecs(int64 usecs)
{
	return usecs - (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
}

/*
 * SHA-256 through OpenSSL's SHA-256 functions.  OpenSSL 3.0 deprecated
 * them in favour of EVP, but they are part of the API of OpenSSL 1.0.1,
 * which PostgreSQL builds against (OPENSSL_API_COMPAT in pg_config.h, under
 * which OpenSSL's headers always declare them), and EVP's dispatch through
 * its provider is a third of what a Merkle node costs: 65 bytes took
 * 104 ns here against 155 through EVP (the digest fetched once, one context
 * kept), an event of 370 bytes in six parts 295 against 330.
 * pg_cryptohash is EVP too, and fetches the digest again at every
 * initialisation, which took longer than hashing a node.
 *
 * orch_sha256_parts: the SHA-256 of n byte strings one after the other.
 */
void
orch_sha256_parts(int n, const void *const *data, const size_t *len, uint8 *out)
{
	SHA256_CTX	ctx;

	/* they only compute, and cannot fail */
	SHA256_Init(&ctx);
	for (int i = 0; i < n; i++)
		SHA256_Update(&ctx, data[i], len[i]);
	SHA256_Final(out, &ctx);
}

void
orch_sha256(const void *data, size_t len, uint8 *out)
{
	orch_sha256_parts(1, &data, &len, out);
}

/*
 * An event's row_hash: the RFC 6962 leaf hash of its canonical encoding
 * (version 1), SHA-256(0x00 || encoding), so that the blocks' Merkle trees
 * take it as it is.  The encoding: the version, audit_id, xid, then the
 * event's own fields interleaved with what its statement shares (h), in
 * the order of docs/audit.md.  event holds its five fields, len bytes,
 * the run_id field starting at middle.
 */
void
orch_audit_event_hash(uint64 xid, const OrchAuditHeader *h, int64 audit_id, const char *event,
					  int middle, int len, uint8 *out)
{
	unsigned char head[2 + 2 * (1 + 4 + 8)];
	const void *parts[6];
	size_t		lens[6];

	/*
	 * The leaf prefix and the version byte, then audit_id and xid: fields
	 * of 8 bytes, big-endian
	 */
	head[0] = ORCH_MERKLE_LEAF_PREFIX;
	head[1] = ORCH_AUDIT_ENCODING_VERSION;
	for (int f = 0; f < 2; f++)
	{
		unsigned char *p = head + 2 + f * 13;
		uint64		v = f == 0 ? (uint64) audit_id : xid;

		p[0] = 1;
		p[1] = p[2] = p[3] = 0;
		p[4] = 8;
		for (int i = 0; i < 8; i++)
			p[5 + i] = (unsigned char) (v >> (56 - 8 * i));
	}
	parts[0] = head;
	lens[0] = sizeof(head);
	parts[1] = h->data;
	lens[1] = h->who;
	parts[2] = event;
	lens[2] = middle;
	parts[3] = h->data + h->who;
	lens[3] = h->why - h->who;
	parts[4] = event + middle;
	lens[4] = len - middle;
	parts[5] = h->data + h->why;
	lens[5] = h->len - h->why;
	orch_sha256_parts(6, parts, lens, out);
}

/*
 * Split nfields fields of the encoding starting at p, which ends before
 * end; returns where the next byte is, or NULL if they are not well
 * formed.
 */
static const char *
split_fields(const char *p, const char *end, OrchAuditField *f, int nfields)
{
	for (int i = 0; i < nfields; i++)
	{
		uint32		len;

		if (p >= end)
			return NULL;
		if (*p == 0)
		{
			f[i].isnull = true;
			f[i].data = NULL;
			f[i].len = 0;
			p++;
			continue;
		}
		if (*p != 1 || end - p < 5)
			return NULL;
		len = orch_be32(p + 1);
		if ((uint32) (end - p - 5) < len)
			return NULL;
		f[i].isnull = false;
		f[i].data = p + 5;
		f[i].len = len;
		p += 5 + len;
	}
	return p;
}

/*
 * Split a record's events (len bytes at data) into its statements and n
 * events of five fields each; false if they are not exactly that: every
 * statement's seven fields and a count of at least one event, the counts
 * adding up to n.  Each reader of a record splits it once, here.
 */
bool
orch_audit_split_events(const char *data, int len, int n, OrchAuditEvents *ev)
{
	const char *p = data;
	const char *end = data + len;
	int			i = 0;

	if (n < 1 || n > ORCH_AUDIT_RECORD_EVENTS)
		return false;
	ev->n = n;
	ev->base = data;
	ev->start = palloc(sizeof(int) * n);
	ev->end = palloc(sizeof(int) * n);
	ev->middle = palloc(sizeof(int) * n);
	ev->fields = palloc(sizeof(OrchAuditField) * n * ORCH_AUDIT_EVENT_FIELDS);
	ev->stmt = palloc(sizeof(int) * n);
	ev->stmts = palloc(sizeof(OrchAuditStmt) * n);
	ev->nstmts = 0;
	while (i < n)
	{
		OrchAuditStmt *st = &ev->stmts[ev->nstmts];
		const char *h = p;
		uint32		count;

		st->h.data = h;
		p = split_fields(p, end, st->fields, ORCH_AUDIT_STMT_ACTOR);
		if (p == NULL)
			return false;
		st->h.who = (int) (p - h);
		p = split_fields(p, end, st->fields + ORCH_AUDIT_STMT_ACTOR,
						 ORCH_AUDIT_STMT_REASON - ORCH_AUDIT_STMT_ACTOR);
		if (p == NULL)
			return false;
		st->h.why = (int) (p - h);
		p = split_fields(p, end, st->fields + ORCH_AUDIT_STMT_REASON, 1);
		if (p == NULL || end - p < 4)
			return false;
		st->h.len = (int) (p - h);
		count = orch_be32(p);
		p += 4;
		if (count < 1 || count > (uint32) (n - i))
			return false;
		for (uint32 k = 0; k < count; k++, i++)
		{
			OrchAuditField *f = &ev->fields[i * ORCH_AUDIT_EVENT_FIELDS];

			ev->stmt[i] = ev->nstmts;
			ev->start[i] = (int) (p - data);
			p = split_fields(p, end, f, ORCH_AUDIT_FIELD_RUN_ID);
			if (p == NULL)
				return false;
			ev->middle[i] = (int) (p - data) - ev->start[i];
			p = split_fields(p, end, f + ORCH_AUDIT_FIELD_RUN_ID,
							 ORCH_AUDIT_EVENT_FIELDS - ORCH_AUDIT_FIELD_RUN_ID);
			if (p == NULL)
				return false;
			ev->end[i] = (int) (p - data);
		}
		ev->nstmts++;
	}
	return p == end;
}

/* Is this statement a purge's (table orch.audit_log, operation PURGE)? */
bool
orch_audit_is_purge(const OrchAuditStmt *stmt)
{
	const OrchAuditField *t = &stmt->fields[ORCH_AUDIT_STMT_TABLE];
	const OrchAuditField *o = &stmt->fields[ORCH_AUDIT_STMT_OPERATION];

	return !t->isnull && !o->isnull &&
		t->len == strlen(ORCH_AUDIT_PURGE_TABLE) &&
		memcmp(t->data, ORCH_AUDIT_PURGE_TABLE, t->len) == 0 &&
		o->len == strlen(ORCH_AUDIT_PURGE_OPERATION) &&
		memcmp(o->data, ORCH_AUDIT_PURGE_OPERATION, o->len) == 0;
}

/* The canonical encoding of a block (version 1) and its SHA-256. */
void
orch_audit_block_hash(const OrchAuditBlock *b, uint8 *out)
{
	StringInfoData buf;
	const void *parts[2];
	size_t		lens[2];
	Size		tags_len = (Size) b->n_rows * ORCH_AUDIT_TAG_LEN;

	initStringInfo(&buf);
	put_byte(&buf, ORCH_AUDIT_ENCODING_VERSION);
	enc_u64(&buf, (uint64) b->block_id);
	enc_u64(&buf, b->xid_from);
	enc_u64(&buf, b->xid_to);
	enc_u64(&buf, (uint64) unix_usecs(b->sealed_at));
	enc_u64(&buf, (uint64) b->n_rows);
	enc_bytes(&buf, b->merkle_root, PG_SHA256_DIGEST_LENGTH);
	enc_u64(&buf, b->system_identifier);
	enc_u64(&buf, (uint64) b->timeline);
	enc_bytes(&buf, b->prev_hash, PG_SHA256_DIGEST_LENGTH);
	/* records: a field of each one's id and row count, 8 bytes each */
	if ((uint64) b->nrecords * 16 > PG_UINT32_MAX || tags_len > PG_UINT32_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("audit block %lld lists too many rows", (long long) b->block_id)));
	enc_field_head(&buf, (uint32) (b->nrecords * 16));
	for (int64 i = 0; i < b->nrecords; i++)
	{
		put_u64(&buf, (uint64) b->record_ids[i]);
		put_u64(&buf, (uint64) b->record_rows[i]);
	}
	/* row_tags: a field of the tags, hashed where they are */
	enc_field_head(&buf, (uint32) tags_len);
	parts[0] = buf.data;
	lens[0] = buf.len;
	parts[1] = b->row_tags;
	lens[1] = tags_len;
	orch_sha256_parts(2, parts, lens, out);
	pfree(buf.data);
}

/*
 * The Merkle tree hash (RFC 6962, section 2.1) of n leaves, given by their
 * leaf hashes (SHA-256(0x00 || leaf), 32 bytes each: the rows' row_hash):
 * one leaf is its leaf hash, a node SHA-256(0x01 || left || right),
 * splitting at the largest power of two below n; no leaves hash as
 * SHA-256 of nothing.
 */
void
orch_merkle_root(const uint8 *leaf_hashes, int64 n, uint8 *out)
{
	uint8		buf[1 + 2 * PG_SHA256_DIGEST_LENGTH];

	if (n == 0)
		orch_sha256("", 0, out);
	else if (n == 1)
		memcpy(out, leaf_hashes, PG_SHA256_DIGEST_LENGTH);
	else
	{
		int64		k = 1;

		while (k * 2 < n)
			k *= 2;
		buf[0] = ORCH_MERKLE_NODE_PREFIX;
		orch_merkle_root(leaf_hashes, k, buf + 1);
		orch_merkle_root(leaf_hashes + k * PG_SHA256_DIGEST_LENGTH, n - k,
						 buf + 1 + PG_SHA256_DIGEST_LENGTH);
		orch_sha256(buf, sizeof(buf), out);
	}
}

/* ------------------------------------------------------------------------
 * Row images in canonical form, independent of the session's settings
 * ------------------------------------------------------------------------ */

/*
 * Settings under which values are rendered for the audit trail: to_jsonb
 * renders timestamps with the session's time zone, intervals and arrays of
 * dates with its styles, floats with its extra_float_digits.
 */
static const char *const render_settings[][2] = {
	{"TimeZone", "UTC"}, {"DateStyle", "ISO, YMD"}, {"IntervalStyle", "iso_8601"},
	{"extra_float_digits", "1"}, {"bytea_output", "hex"}
};

static int
render_settings_push(void)
{
	int			nest_level = NewGUCNestLevel();

	for (int i = 0; i < (int) lengthof(render_settings); i++)
		(void) set_config_option(render_settings[i][0], render_settings[i][1],
								 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	return nest_level;
}

/* How to render the columns of one table: to_jsonb for each column's type. */
typedef enum RenderKind
{
	RK_TO_JSONB,				/* to_jsonb, under render_settings */
	RK_INTEGER,					/* int2, int4, int8: a number */
	RK_NUMERIC,
	RK_BOOL,
	RK_TEXT,					/* text, varchar: a string of its bytes */
	RK_UUID,					/* a string of its output */
	RK_ENUM,					/* a string of its label */
	RK_JSONB,
	RK_TIMESTAMPTZ,				/* ISO 8601 in UTC */
	RK_INTERVAL					/* ISO 8601 (as IntervalStyle iso_8601) */
} RenderKind;

/*
 * The labels of an enum, by the OID of each (ascending): enum_out looks its
 * label up in the catalog cache for every value.  Adding or renaming a
 * value invalidates the rendering of every audited table (render_for); a
 * value not listed, added by a change whose invalidation has not been
 * processed yet, is rendered by enum_out.
 */
typedef struct EnumLabel
{
	Oid			oid;			/* first: the sort and search key */
	char	   *label;
} EnumLabel;

typedef struct EnumLabels
{
	int			n;
	EnumLabel  *values;			/* by oid */
	FmgrInfo	output;			/* enum_out, for a value not listed */
} EnumLabels;

typedef struct RelRender
{
	TupleDesc	desc;
	RenderKind *kind;			/* per attribute */
	Oid		   *base_type;		/* per attribute: the type under any domain */
	EnumLabels **labels;		/* per attribute, for RK_ENUM */
	char	  **name_enc;		/* per attribute: its name as an object key is
								 * encoded (length, UTF-8 bytes) */
	int		   *name_enc_len;	/* and how long that is */
	FmgrInfo   *to_jsonb;		/* per attribute; fn_oid InvalidOid if dropped */
	int		   *order;			/* the live attributes' indexes, in jsonb's key order */
	int			ncols;			/* how many */
	int		   *key_order;		/* those of the primary key, in that order */
	int			nkeys;			/* how many; 0 without a primary key */
	AttrNumber	run_attr;		/* "run_id uuid", or 0 */
	AttrNumber	step_attr;		/* "step_id bigint", or 0 */
} RelRender;

/* One statement's rendering: its table's, and whether render_settings are in force. */
typedef struct RenderStmt
{
	const RelRender *rr;
	int			settings_level; /* GUC nest level of render_settings, or 0 */
} RenderStmt;

/* jsonb's order of keys: shorter names first, then by their bytes */
static int
key_order_cmp(const void *a, const void *b, void *arg)
{
	TupleDesc	desc = (TupleDesc) arg;
	const char *x = NameStr(TupleDescAttr(desc, *(const int *) a)->attname);
	const char *y = NameStr(TupleDescAttr(desc, *(const int *) b)->attname);
	size_t		lx = strlen(x);
	size_t		ly = strlen(y);

	if (lx != ly)
		return lx < ly ? -1 : 1;
	return memcmp(x, y, lx);
}

/* EnumLabels.values' order, and a search in it with an Oid as the key */
static int
oid_order(const void *a, const void *b)
{
	Oid			x = *(const Oid *) a;
	Oid			y = *(const Oid *) b;

	return x < y ? -1 : x > y;
}

static EnumLabels *
enum_labels(Oid enumtype)
{
	EnumLabels *el = palloc(sizeof(EnumLabels));
	CatCList   *list = SearchSysCacheList1(ENUMTYPOIDNAME, ObjectIdGetDatum(enumtype));
	Oid			outfn;
	bool		varlena;

	el->n = list->n_members;
	el->values = palloc(sizeof(EnumLabel) * Max(el->n, 1));
	for (int i = 0; i < el->n; i++)
	{
		Form_pg_enum e = (Form_pg_enum) GETSTRUCT(&list->members[i]->tuple);

		el->values[i].oid = e->oid;
		el->values[i].label = pstrdup(NameStr(e->enumlabel));
	}
	ReleaseSysCacheList(list);
	qsort(el->values, el->n, sizeof(EnumLabel), oid_order);
	getTypeOutputInfo(enumtype, &outfn, &varlena);
	fmgr_info(outfn, &el->output);
	return el;
}

/*
 * A column's name as an object key is encoded: its length and UTF-8 bytes,
 * in a chunk of just that size (it lives as long as the table's rendering;
 * the StringInfo it is built in starts at 1 kB).
 */
static char *
encoded_key(const char *name, int *enclen)
{
	StringInfoData key;
	char	   *enc;

	initStringInfo(&key);
	put_string(&key, name, (int) strlen(name));
	enc = palloc(key.len);
	memcpy(enc, key.data, key.len);
	*enclen = key.len;
	pfree(key.data);
	return enc;
}

static void
rel_render_init(RelRender *rr, Relation rel)
{
	TupleDesc	desc = CreateTupleDescCopyConstr(RelationGetDescr(rel));	/* with missing values */
	Bitmapset  *pk = RelationGetIndexAttrBitmap(rel, INDEX_ATTR_BITMAP_PRIMARY_KEY);

	rr->desc = desc;
	rr->kind = palloc0(sizeof(RenderKind) * desc->natts);
	rr->base_type = palloc0(sizeof(Oid) * desc->natts);
	rr->labels = palloc0(sizeof(EnumLabels *) * desc->natts);
	rr->name_enc = palloc0(sizeof(char *) * desc->natts);
	rr->name_enc_len = palloc0(sizeof(int) * desc->natts);
	rr->to_jsonb = palloc0(sizeof(FmgrInfo) * desc->natts);
	rr->order = palloc(sizeof(int) * Max(desc->natts, 1));
	rr->ncols = 0;
	rr->key_order = palloc(sizeof(int) * Max(desc->natts, 1));
	rr->nkeys = 0;
	rr->run_attr = 0;
	rr->step_attr = 0;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		Oid			base;

		if (att->attisdropped)
			continue;
		rr->order[rr->ncols++] = i;
		rr->name_enc[i] = encoded_key(NameStr(att->attname), &rr->name_enc_len[i]);
		/* the common types directly; the others as to_jsonb renders them */
		base = getBaseType(att->atttypid);
		rr->base_type[i] = base;
		switch (base)
		{
			case INT2OID:
			case INT4OID:
			case INT8OID:
				rr->kind[i] = RK_INTEGER;
				break;
			case NUMERICOID:
				rr->kind[i] = RK_NUMERIC;
				break;
			case BOOLOID:
				rr->kind[i] = RK_BOOL;
				break;
			case TEXTOID:
			case VARCHAROID:
				rr->kind[i] = RK_TEXT;
				break;
			case JSONBOID:
				rr->kind[i] = RK_JSONB;
				break;
			case TIMESTAMPTZOID:
				rr->kind[i] = RK_TIMESTAMPTZ;
				break;
			case UUIDOID:
				rr->kind[i] = RK_UUID;
				break;
			case INTERVALOID:
				rr->kind[i] = RK_INTERVAL;
				break;
			default:
				if (type_is_enum(base))
				{
					rr->kind[i] = RK_ENUM;
					rr->labels[i] = enum_labels(base);
				}
				else
					rr->kind[i] = RK_TO_JSONB;
				break;
		}
		/* to_jsonb(anyelement) learns the type from its call expression */
		fmgr_info(F_TO_JSONB, &rr->to_jsonb[i]);
		rr->to_jsonb[i].fn_expr = (Node *)
			makeFuncExpr(F_TO_JSONB, JSONBOID,
						 list_make1(makeNullConst(att->atttypid, att->atttypmod, att->attcollation)),
						 InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
		if (strcmp(NameStr(att->attname), "run_id") == 0 && att->atttypid == UUIDOID)
			rr->run_attr = att->attnum;
		if (strcmp(NameStr(att->attname), "step_id") == 0 && att->atttypid == INT8OID)
			rr->step_attr = att->attnum;
	}
	qsort_arg(rr->order, rr->ncols, sizeof(int), key_order_cmp, desc);
	for (int k = 0; k < rr->ncols; k++)
		if (bms_is_member(TupleDescAttr(desc, rr->order[k])->attnum - FirstLowInvalidHeapAttributeNumber, pk))
			rr->key_order[rr->nkeys++] = rr->order[k];
}

/*
 * How to render each audited table, kept for the backend's life: building
 * it looks up every column's type and output function, which for a
 * statement that changes one row costs more than rendering the row.  An
 * entry is built again after an invalidation of its table (ALTER TABLE, a
 * new primary key) or of every table, and after any change to a schema,
 * which may rename the table's.
 *
 * A statement renders with the RelRender it got, to its end, even if the
 * entry is built again meanwhile (by the trigger of a statement that runs
 * inside its rendering): an entry's old memory is handed to the
 * transaction, which frees it at its end, and an entry built while an
 * invalidation arrived is built once more.
 */
typedef struct RenderCacheEntry
{
	Oid			relid;			/* the hash key */
	bool		valid;
	MemoryContext cxt;			/* holds rr and table_name */
	RelRender  *rr;
	char	   *table_name;		/* schema-qualified, quoted where needed */
} RenderCacheEntry;

static HTAB *render_cache = NULL;
static uint64 render_invalidations = 0;

/* entries of dropped tables are removed when the cache holds more than this */
#define RENDER_CACHE_SWEEP	256

static void
render_cache_forget(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS seq;
	RenderCacheEntry *e;

	render_invalidations++;
	if (render_cache == NULL)
		return;
	if (OidIsValid(relid))
	{
		e = hash_search(render_cache, &relid, HASH_FIND, NULL);
		if (e != NULL)
			e->valid = false;
		return;
	}
	hash_seq_init(&seq, render_cache);
	while ((e = hash_seq_search(&seq)) != NULL)
		e->valid = false;
}

static void
render_cache_forget_all(Datum arg, int cacheid, uint32 hashvalue)
{
	render_cache_forget(arg, InvalidOid);
}

/* Hand an entry's memory to the transaction, which frees it at its end. */
static void
render_cache_retire(RenderCacheEntry *e)
{
	if (e->cxt != NULL)
		MemoryContextSetParent(e->cxt, TopTransactionContext);
	e->cxt = NULL;
	e->rr = NULL;
	e->table_name = NULL;
}

/* Remove the entries no statement has asked for since they were invalidated. */
static void
render_cache_sweep(Oid keep)
{
	HASH_SEQ_STATUS seq;
	RenderCacheEntry *e;

	hash_seq_init(&seq, render_cache);
	while ((e = hash_seq_search(&seq)) != NULL)
		if (!e->valid && e->relid != keep)
		{
			render_cache_retire(e);
			(void) hash_search(render_cache, &e->relid, HASH_REMOVE, NULL);
		}
}

static RenderCacheEntry *
render_for(Relation rel)
{
	Oid			relid = RelationGetRelid(rel);
	RenderCacheEntry *e;
	bool		found;

	if (render_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(RenderCacheEntry);
		ctl.hcxt = CacheMemoryContext;
		render_cache = hash_create("orchestrator audit rendering", 32, &ctl,
								   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		CacheRegisterRelcacheCallback(render_cache_forget, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACEOID, render_cache_forget_all, (Datum) 0);
		CacheRegisterSyscacheCallback(ENUMOID, render_cache_forget_all, (Datum) 0);
	}
	e = hash_search(render_cache, &relid, HASH_ENTER, &found);
	if (!found)
	{
		e->valid = false;
		e->cxt = NULL;
		e->rr = NULL;
		e->table_name = NULL;
	}
	while (!e->valid)
	{
		uint64		seen = render_invalidations;
		MemoryContext cxt;
		MemoryContext oldcxt;
		RelRender  *rr;
		char	   *table_name;

		/* under the transaction until built: an error mid-way frees it */
		cxt = AllocSetContextCreate(TopTransactionContext, "orchestrator audit rendering",
									ALLOCSET_SMALL_SIZES);
		oldcxt = MemoryContextSwitchTo(cxt);
		rr = palloc(sizeof(RelRender));
		rel_render_init(rr, rel);
		table_name = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												RelationGetRelationName(rel));
		MemoryContextSwitchTo(oldcxt);
		if (render_invalidations != seen)
		{
			/* built from catalogs that changed meanwhile: again */
			MemoryContextDelete(cxt);
			continue;
		}
		render_cache_retire(e);
		MemoryContextSetParent(cxt, CacheMemoryContext);
		e->cxt = cxt;
		e->rr = rr;
		e->table_name = table_name;
		e->valid = true;
		if (hash_get_num_entries(render_cache) > RENDER_CACHE_SWEEP)
			render_cache_sweep(relid);
	}
	return e;
}

static char *
put_digits(char *p, int v, int width)
{
	for (int k = width - 1; k >= 0; k--, v /= 10)
		p[k] = (char) ('0' + v % 10);
	return p + width;
}

/*
 * The timestamps of the years 1 to 9999 (UTC), from 0001-01-01 (Julian day
 * 1721426) to before 10000-01-01 (day 5373485): a row image stores one as
 * its microseconds (tag 'D'), which utc_iso8601 renders.
 */
#define ISO_YEARS_FROM	((TimestampTz) (1721426 - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY)
#define ISO_YEARS_TO	((TimestampTz) (5373485 - POSTGRES_EPOCH_JDATE) * USECS_PER_DAY)

static bool
iso_years(TimestampTz t)
{
	return t >= ISO_YEARS_FROM && t < ISO_YEARS_TO;
}

/*
 * A timestamptz of the years 1 to 9999 (iso_years) as to_jsonb writes it
 * in UTC (JsonEncodeDateTime): YYYY-MM-DDTHH:MM:SS, the fraction of a
 * second without its trailing zeros, then +00:00.  Returns its length.
 */
static int
utc_iso8601(TimestampTz t, char *buf)
{
	struct pg_tm tm;
	fsec_t		fsec;
	char	   *p = buf;

	Assert(iso_years(t));
	if (timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
		elog(ERROR, "timestamp out of range");
	p = put_digits(p, tm.tm_year, 4);
	*p++ = '-';
	p = put_digits(p, tm.tm_mon, 2);
	*p++ = '-';
	p = put_digits(p, tm.tm_mday, 2);
	*p++ = 'T';
	p = put_digits(p, tm.tm_hour, 2);
	*p++ = ':';
	p = put_digits(p, tm.tm_min, 2);
	*p++ = ':';
	p = put_digits(p, tm.tm_sec, 2);
	if (fsec != 0)
	{
		int			digits = 6;

		while (fsec % 10 == 0)
		{
			fsec /= 10;
			digits--;
		}
		*p++ = '.';
		p = put_digits(p, fsec, digits);
	}
	memcpy(p, "+00:00", 6);
	return (int) (p - buf) + 6;
}

/*
 * One column's value in canonical form (docs/audit.md), as to_jsonb would
 * render it under render_settings: the common types directly, the others
 * through to_jsonb; a timestamptz (of the years 1 to 9999) and a uuid in
 * forms of their own, D and U, which read back as to_jsonb renders them.
 */
static void
enc_value(StringInfo out, RenderStmt *rs, int i, Datum value, bool isnull)
{
	const RelRender *rr = rs->rr;
	Jsonb	   *jb;

	if (isnull)
	{
		put_byte(out, 'Z');
		return;
	}
	switch (rr->kind[i])
	{
		case RK_INTEGER:
			{
				char		num[MAXINT8LEN + 1];
				int			len = pg_lltoa(rr->base_type[i] == INT2OID ? DatumGetInt16(value) :
										   rr->base_type[i] == INT4OID ? DatumGetInt32(value) :
										   DatumGetInt64(value), num);

				put_byte(out, 'N');
				put_u32(out, (uint32) len);
				put_raw(out, num, len);
				return;
			}
		case RK_NUMERIC:
			if (numeric_is_nan(DatumGetNumeric(value)) || numeric_is_inf(DatumGetNumeric(value)))
				break;			/* not a JSON number: as to_jsonb has it */
			put_number(out, DatumGetNumeric(value));
			return;
		case RK_BOOL:
			put_byte(out, DatumGetBool(value) ? 'T' : 'F');
			return;
		case RK_TEXT:
			{
				text	   *t = DatumGetTextPP(value);

				put_byte(out, 'S');
				put_string(out, VARDATA_ANY(t), (int) VARSIZE_ANY_EXHDR(t));
				return;
			}
		case RK_UUID:
			put_byte(out, 'U');
			put_raw(out, (const char *) DatumGetUUIDP(value)->data, UUID_LEN);
			return;
		case RK_ENUM:
			{
				const EnumLabels *el = rr->labels[i];
				Oid			oid = DatumGetObjectId(value);
				const EnumLabel *at = bsearch(&oid, el->values, el->n, sizeof(EnumLabel), oid_order);
				const char *str = at != NULL ? at->label
					: OutputFunctionCall((FmgrInfo *) &el->output, value);

				put_byte(out, 'S');
				put_string(out, str, (int) strlen(str));
				return;
			}
		case RK_TIMESTAMPTZ:
			{
				static const int utc = 0;
				TimestampTz t = DatumGetTimestampTz(value);
				char	   *str;

				if (iso_years(t))
				{
					put_byte(out, 'D');
					put_u64(out, (uint64) unix_usecs(t));
					return;
				}
				/* infinities, years before 1 and after 9999: as text */
				str = JsonEncodeDateTime(NULL, value, TIMESTAMPTZOID, &utc);
				put_byte(out, 'S');
				put_string(out, str, (int) strlen(str));
				return;
			}
		case RK_INTERVAL:
			{
				/* interval_out, with the style given instead of the setting's */
				struct pg_itm itm;
				char		buf[MAXDATELEN + 1];

				interval2itm(*DatumGetIntervalP(value), &itm);
				EncodeInterval(&itm, INTSTYLE_ISO_8601, buf);
				put_byte(out, 'S');
				put_string(out, buf, (int) strlen(buf));
				return;
			}
		case RK_JSONB:
			json_canon(out, &DatumGetJsonbP(value)->root);
			return;
		case RK_TO_JSONB:
			break;
	}
	if (rs->settings_level == 0)
		rs->settings_level = render_settings_push();	/* until the statement's rows are done */
	jb = DatumGetJsonbP(FunctionCall1(&rr->to_jsonb[i], value));
	json_canon(out, &jb->root);
}

static bool
column_changed(Form_pg_attribute att, Datum a, bool anull, Datum b, bool bnull)
{
	if (anull || bnull)
		return anull != bnull;
	if (att->attlen == -1)
	{
		struct varlena *pa = (struct varlena *) DatumGetPointer(a);
		struct varlena *pb = (struct varlena *) DatumGetPointer(b);
		struct varlena *va;
		struct varlena *vb;
		bool		changed;

		/* an UPDATE that leaves a toasted value alone keeps its pointer */
		if (VARATT_IS_EXTERNAL_ONDISK(pa) && VARATT_IS_EXTERNAL_ONDISK(pb) &&
			VARSIZE_EXTERNAL(pa) == VARSIZE_EXTERNAL(pb) &&
			memcmp(pa, pb, VARSIZE_EXTERNAL(pa)) == 0)
			return false;
		va = PG_DETOAST_DATUM_PACKED(a);
		vb = PG_DETOAST_DATUM_PACKED(b);
		changed = VARSIZE_ANY_EXHDR(va) != VARSIZE_ANY_EXHDR(vb) ||
			memcmp(VARDATA_ANY(va), VARDATA_ANY(vb), VARSIZE_ANY_EXHDR(va)) != 0;
		if (va != pa)
			pfree(va);
		if (vb != pb)
			pfree(vb);
		return changed;
	}
	return !datumIsEqual(a, b, att->attbyval, att->attlen);
}

/*
 * The columns an UPDATE changed, in jsonb's key order (as rr->order lists
 * them) into changed; returns how many.
 */
static int
changed_columns(const RelRender *rr, TupleTableSlot *before, TupleTableSlot *after, int *changed)
{
	int			n = 0;

	slot_getallattrs(before);
	slot_getallattrs(after);
	for (int k = 0; k < rr->ncols; k++)
	{
		int			i = rr->order[k];

		if (column_changed(TupleDescAttr(rr->desc, i),
						   before->tts_values[i], before->tts_isnull[i],
						   after->tts_values[i], after->tts_isnull[i]))
			changed[n++] = i;
	}
	return n;
}

/*
 * A row image as a field of the encoding: a JSON object of the n columns
 * cols lists, in jsonb's key order (all of them: rr->order; the primary
 * key's: rr->key_order; those an UPDATE changed: changed_columns).
 */
static void
enc_row(StringInfo out, RenderStmt *rs, TupleTableSlot *slot, const int *cols, int n)
{
	const RelRender *rr = rs->rr;
	int			len_at;

	slot_getallattrs(slot);
	put_byte(out, 1);
	len_at = out->len;
	put_u32(out, 0);
	put_byte(out, 'O');
	put_u32(out, (uint32) n);
	for (int k = 0; k < n; k++)
	{
		int			i = cols[k];

		put_raw(out, rr->name_enc[i], rr->name_enc_len[i]);
		enc_value(out, rs, i, slot->tts_values[i], slot->tts_isnull[i]);
	}
	patch_u32(out, len_at, (uint32) (out->len - len_at - 4));
}

/* ------------------------------------------------------------------------
 * Writing audit rows
 * ------------------------------------------------------------------------ */

static Oid	audit_seq = InvalidOid;	/* record_id's sequence ... */
static Oid	audit_seq_of = InvalidOid;	/* ... of this orch.audit_records */

/*
 * What the events of one statement (or one audit event) share: who, when,
 * why, the table and the operation, encoded once as the header that each
 * record taking its events holds.
 */
typedef struct AuditStmt
{
	uint64		serial;			/* the backend's statements, numbered from 1 */
	MemoryContext cxt;			/* the statement's: its own records live there */
	Oid			relid;			/* orch.audit_records */
	uint64		xid;
	TimestampTz at;
	OrchAuditHeader h;			/* at ... reason, encoded */
	bool		own_records;	/* its events go to records of its own (record_for) */
	struct AuditRecord *own;	/* the one being filled, if any */
	bool		purge;			/* a purge's event */
} AuditStmt;

/*
 * A record being filled: one row of orch.audit_records to be, its
 * statements' headers and events so far (docs/audit.md).
 */
typedef struct AuditRecord
{
	Oid			relid;			/* orch.audit_records */
	uint64		xid;
	TimestampTz at;				/* its first statement's */
	int64		record_id;		/* 0 before its first event */
	int			n;				/* its events */
	StringInfoData events;		/* a varlena header's room, then its statements */
	StringInfoData hashes;		/* the same, then its events' hashes */
	pg_uuid_t  *runs;			/* their runs, nruns of them (not sorted; some repeats) */
	int			nruns;
	int			runs_cap;
	bool		purge;
	uint64		stmt;			/* serial of the statement it takes events of now; 0: none */
	bool		in_event;		/* an event is being added (event_begin to event_end) */
	int			count_at;		/* where that statement's event count is in events */
	uint32		count;
	int			event_start;	/* where the event being added starts in events */
} AuditRecord;

/*
 * The transaction's record, written when it commits (or when full, outside
 * any subtransaction); NULL until the transaction's first event.  Its
 * buffers live in TopTransactionContext.
 */
static AuditRecord *xact_record = NULL;

/*
 * Where the transaction's record stood when a statement of a
 * subtransaction began adding to it, so that the events of a
 * subtransaction that rolls back can be taken out again.  Subtransaction
 * ids grow, so a mark of an id at least that of the subtransaction rolling
 * back was made inside it (it stayed open since it began), and nothing in
 * the record after its first such mark was added by a level outside it
 * (which could add only once it had ended): it takes out everything from
 * that mark on.
 */
typedef struct AuditMark
{
	SubTransactionId subid;
	int			events_len;
	int			n;
	int			nruns;
} AuditMark;

static AuditMark *marks = NULL;	/* in TopTransactionContext */
static int	nmarks = 0;
static int	marks_cap = 0;

/* the transaction's record is written: events after it get records of their own */
static bool xact_record_written = false;
/* events the transaction has recorded, its rolled back subtransactions' included */
static int64 xact_events = 0;

static uint64 stmt_serial = 0;

/*
 * Where orch.audit_records' columns are in a tuple descriptor of it, in
 * the order of ORCH_AUDIT_COL_*.
 */
void
orch_audit_column_map(TupleDesc desc, int *col)
{
	static const char *const names[ORCH_AUDIT_NCOLS] = {
		"record_id", "xid", "at", "n_events", "events", "hashes", "run_ids", "purge"
	};

	for (int c = 0; c < ORCH_AUDIT_NCOLS; c++)
	{
		col[c] = -1;
		for (int a = 0; a < desc->natts; a++)
			if (!TupleDescAttr(desc, a)->attisdropped &&
				strcmp(NameStr(TupleDescAttr(desc, a)->attname), names[c]) == 0)
				col[c] = a;
		if (col[c] < 0)
			elog(ERROR, "orch.audit_records has no column %s", names[c]);
	}
}

/*
 * uuids in the order of their bytes (uuid_cmp's), compared as two
 * big-endian 64-bit halves: sort_uuids is a sort specialized for them,
 * which sorts a record's few hundred run ids without a call per comparison.
 */
static inline int
uuid_order(const pg_uuid_t *a, const pg_uuid_t *b)
{
	uint64		x;
	uint64		y;

	for (int half = 0; half < 2; half++)
	{
		memcpy(&x, a->data + 8 * half, sizeof(x));
		memcpy(&y, b->data + 8 * half, sizeof(y));
		x = pg_ntoh64(x);
		y = pg_ntoh64(y);
		if (x != y)
			return x < y ? -1 : 1;
	}
	return 0;
}

#define ST_SORT sort_uuids
#define ST_ELEMENT_TYPE pg_uuid_t
#define ST_COMPARE(a, b) uuid_order(a, b)
#define ST_SCOPE static
#define ST_DEFINE
#include "lib/sort_template.h"

/*
 * Sort n run ids and keep each once, in place; returns how many remain.  A
 * record's run_ids is this of its events' runs, for the writer and the
 * verifier alike.
 */
int
orch_audit_distinct_runs(pg_uuid_t *runs, int n)
{
	int			distinct = 0;

	sort_uuids(runs, n);
	for (int i = 0; i < n; i++)
		if (distinct == 0 || memcmp(&runs[i], &runs[distinct - 1], sizeof(pg_uuid_t)) != 0)
			runs[distinct++] = runs[i];
	return distinct;
}

/* The distinct runs of the record's events, as a uuid[]; NULL if none. */
static ArrayType *
record_runs(AuditRecord *r)
{
	Datum	   *elems;
	int			n;

	if (r->nruns == 0)
		return NULL;
	n = orch_audit_distinct_runs(r->runs, r->nruns);
	r->nruns = n;
	elems = palloc(sizeof(Datum) * n);
	for (int i = 0; i < n; i++)
		elems[i] = UUIDPGetDatum(&r->runs[i]);
	return construct_array(elems, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR);
}

/*
 * A buffer begun with room for a varlena header (buffer_begin) as a bytea,
 * in place.
 */
static void
buffer_begin(StringInfo s)
{
	resetStringInfo(s);
	reserve(s, VARHDRSZ);
	s->len = VARHDRSZ;
}

static bytea *
buffer_bytea(StringInfo s)
{
	SET_VARSIZE(s->data, s->len);
	return (bytea *) s->data;
}

/*
 * Where a transaction's records go: orch.audit_records, its indexes and
 * what inserting into them needs, opened at the transaction's first record
 * and kept until its end.  Opening them for every record cost as much as
 * the insert itself: the indexes' descriptors, the run index's GIN state,
 * the partial index's predicate.
 *
 * They are opened under the transaction's own resource owner, not a
 * subtransaction's: a step's subtransaction that commits would otherwise
 * report them as leaked, and one that rolls back would close them under
 * us.  They are closed before commit (and before PREPARE), forgotten on
 * abort (the resource owner closes them), closed before any utility
 * statement of the session (one that drops or alters orch.audit_records
 * must not find it in use), and reopened after a relcache invalidation of
 * orch.audit_records (an index added, a column dropped).
 */
typedef struct AuditTarget
{
	Oid			relid;			/* InvalidOid: nothing open */
	bool		stale;			/* invalidated: reopen before use */
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	int			col[ORCH_AUDIT_NCOLS];
} AuditTarget;

static AuditTarget audit_target_open;

static void
audit_target_close(bool abort)
{
	AuditTarget *t = &audit_target_open;

	if (t->relid == InvalidOid)
		return;
	if (!abort)
	{
		ResourceOwner save = CurrentResourceOwner;

		CurrentResourceOwner = TopTransactionResourceOwner;
		ExecCloseIndices(t->rri);
		ExecResetTupleTable(t->estate->es_tupleTable, false);
		FreeExecutorState(t->estate);
		table_close(t->rel, NoLock);
		CurrentResourceOwner = save;
	}
	/* on abort, the resource owner closes them and the memory goes with the transaction */
	memset(t, 0, sizeof(*t));
}

static void record_flush(AuditRecord *r);

/* The transaction is over: forget its record and marks (their memory went with it). */
static void
xact_record_forget(void)
{
	xact_record = NULL;
	marks = NULL;
	nmarks = marks_cap = 0;
	xact_record_written = false;
	xact_events = 0;
}

static void
audit_xact(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:

			/*
			 * Write the transaction's record.  If orch.audit_records was
			 * dropped since its first event (the extension dropped in this
			 * transaction), its events went with the audit trail they were
			 * for.
			 */
			if (xact_record != NULL && xact_record->n > 0 &&
				orch_relid_extended("audit_records", true) == xact_record->relid)
				record_flush(xact_record);
			xact_record_written = true;
			audit_target_close(false);
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			xact_record_forget();
			audit_target_close(true);
			break;
	}
}

/* A subtransaction rolled back: its events leave the transaction's record. */
static void
audit_subxact(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid,
			  void *arg)
{
	if (event != SUBXACT_EVENT_ABORT_SUB || xact_record == NULL)
		return;
	for (int i = 0; i < nmarks; i++)
		if (marks[i].subid >= mySubid)
		{
			AuditRecord *r = xact_record;

			r->events.len = marks[i].events_len;
			r->hashes.len = VARHDRSZ + marks[i].n * ORCH_HASH_LEN;
			r->n = marks[i].n;
			r->nruns = marks[i].nruns;
			r->stmt = 0;
			r->in_event = false;
			nmarks = i;
			break;
		}
}

static void
audit_target_invalidate(Datum arg, Oid relid)
{
	if (audit_target_open.relid != InvalidOid &&
		(relid == InvalidOid || relid == audit_target_open.relid))
		audit_target_open.stale = true;
}

/* Before a utility statement: nothing of the audit tables stays open. */
void
orch_audit_before_utility(void)
{
	if (audit_target_open.relid != InvalidOid && IsTransactionState())
		audit_target_close(false);
}

/*
 * The transaction and subtransaction callbacks, and the relcache callback
 * of the audit target; from _PG_init, however the library is loaded, so
 * that they are in place before any transaction (one whose first event
 * came in another extension's pre-commit callback would otherwise miss
 * this one's).
 */
void
orch_audit_register_callbacks(void)
{
	RegisterXactCallback(audit_xact, NULL);
	RegisterSubXactCallback(audit_subxact, NULL);
	CacheRegisterRelcacheCallback(audit_target_invalidate, (Datum) 0);
}

static AuditTarget *
audit_target(Oid relid)
{
	AuditTarget *t = &audit_target_open;
	ResourceOwner save;
	MemoryContext oldcxt;

	if (t->relid == relid && !t->stale)
		return t;
	audit_target_close(false);

	save = CurrentResourceOwner;
	CurrentResourceOwner = TopTransactionResourceOwner;
	oldcxt = MemoryContextSwitchTo(TopTransactionContext);
	PG_TRY();
	{
		t->rel = table_open(relid, RowExclusiveLock);
		orch_audit_column_map(RelationGetDescr(t->rel), t->col);
		t->estate = CreateExecutorState();
		t->rri = makeNode(ResultRelInfo);
		InitResultRelInfo(t->rri, t->rel, 1, NULL, 0);
		orch_open_indices(t->rri);
		t->slot = table_slot_create(t->rel, &t->estate->es_tupleTable);
		t->relid = relid;
		t->stale = false;
	}
	PG_CATCH();
	{
		/*
		 * Close the table if it was opened (an index that failed to open
		 * leaves orch_open_indices's arrays half filled: the indexes opened
		 * before it are left to the transaction's resource owner).
		 */
		CurrentResourceOwner = TopTransactionResourceOwner;
		if (t->rel != NULL)
			table_close(t->rel, NoLock);
		memset(t, 0, sizeof(*t));
		CurrentResourceOwner = save;
		MemoryContextSwitchTo(oldcxt);
		PG_RE_THROW();
	}
	PG_END_TRY();
	CurrentResourceOwner = save;
	MemoryContextSwitchTo(oldcxt);
	return t;
}

/* An empty record, its buffers in cxt. */
static AuditRecord *
record_create(MemoryContext cxt, const AuditStmt *st)
{
	MemoryContext oldcxt = MemoryContextSwitchTo(cxt);
	AuditRecord *r = palloc0(sizeof(AuditRecord));

	r->relid = st->relid;
	r->xid = st->xid;
	r->purge = st->purge;
	initStringInfo(&r->events);
	initStringInfo(&r->hashes);
	buffer_begin(&r->events);
	buffer_begin(&r->hashes);
	r->runs_cap = 8;
	r->runs = palloc(sizeof(pg_uuid_t) * r->runs_cap);
	MemoryContextSwitchTo(oldcxt);
	return r;
}

static bool
record_full(const AuditRecord *r)
{
	return r->n >= ORCH_AUDIT_RECORD_EVENTS || r->events.len >= AUDIT_RECORD_BYTES;
}

/*
 * LZ4's acceleration for records of at least EVENTS_LZ4_FAST_FROM bytes:
 * 3 compressed an engine batch's record of 800 events (270 kB) a quarter
 * faster than 1 (the default), and as small (8.5 times against 8.3), from
 * 64 kB on no larger; a record of a task's verdict (about 1 kB) came out a
 * quarter larger, so smaller records keep 1.
 */
#define EVENTS_LZ4_ACCELERATION 3
#define EVENTS_LZ4_FAST_FROM	(64 * 1024)

/*
 * events compressed with LZ4 into a compressed datum as
 * toast_compress_datum makes it (the same block format, header and
 * method), or 0 if that saves too little to be worth it.  Each call
 * compresses on its own, but with the session's compression state,
 * reset in a few instructions: toast_compress_datum starts from a new
 * one, whose 16 kB hash table it clears first, which took more than the
 * compression of a record of a few events.
 */
static Datum
events_lz4(bytea *events)
{
	static LZ4_stream_t *stream;
	int32		rawsize = VARSIZE(events) - VARHDRSZ;
	int32		bound = LZ4_compressBound(rawsize);
	struct varlena *out;
	int			len;

	if (stream == NULL)
	{
		/* palloc's alignment is the state's (LZ4_initStream checks it) */
		stream = LZ4_initStream(MemoryContextAlloc(TopMemoryContext, sizeof(LZ4_stream_t)),
								sizeof(LZ4_stream_t));
		if (stream == NULL)
			elog(ERROR, "could not set up LZ4 compression");
	}
	LZ4_resetStream_fast(stream);
	out = palloc(VARHDRSZ_COMPRESSED + bound);
	len = LZ4_compress_fast_continue(stream, VARDATA(events), (char *) out + VARHDRSZ_COMPRESSED,
									 rawsize, bound,
									 rawsize >= EVENTS_LZ4_FAST_FROM ? EVENTS_LZ4_ACCELERATION : 1);
	if (len <= 0)
		elog(ERROR, "LZ4 compression of an audit record failed");

	/* as toast_compress_datum: a gain of more than the header's padding, or none */
	if ((int32) VARHDRSZ_COMPRESSED + len >= rawsize - 2)
	{
		pfree(out);
		return (Datum) 0;
	}
	SET_VARSIZE_COMPRESSED(out, VARHDRSZ_COMPRESSED + len);
	TOAST_COMPRESS_SET_SIZE_AND_COMPRESS_METHOD(out, rawsize, TOAST_LZ4_COMPRESSION_ID);
	return PointerGetDatum(out);
}

/*
 * A record's events, compressed in line with the column's compression
 * method when that makes them smaller; else as they are.  PostgreSQL
 * compresses a row's values only when the row passes TOAST_TUPLE_THRESHOLD
 * (about 2 kB), and most records are smaller: a task's claim or verdict
 * writes one of 0.5 to 1.3 kB, which its column names and its
 * statement's who and why repeated make compress to a half to three
 * quarters.  Left alone when the column's storage forbids compression
 * (plain or external).
 */
static Datum
events_compress(AuditTarget *t, bytea *events)
{
	Form_pg_attribute att = TupleDescAttr(RelationGetDescr(t->rel),
										  t->col[ORCH_AUDIT_COL_EVENTS]);
	char		cmethod = att->attcompression;
	Datum		compressed;

	if (VARSIZE(events) < AUDIT_COMPRESS_MIN ||
		(att->attstorage != TYPSTORAGE_EXTENDED && att->attstorage != TYPSTORAGE_MAIN))
		return PointerGetDatum(events);
	if (!CompressionMethodIsValid(cmethod))
		cmethod = default_toast_compression;
	if (cmethod == TOAST_LZ4_COMPRESSION)
		compressed = events_lz4(events);
	else
		compressed = toast_compress_datum(PointerGetDatum(events), cmethod);
	return compressed != (Datum) 0 ? compressed : PointerGetDatum(events);
}

/*
 * Write a record to orch.audit_records, with its index entries, and empty
 * it: one row for up to ORCH_AUDIT_RECORD_EVENTS events, its events
 * compressed (events_compress), and stored out of line when still too
 * large for the row.  No trigger, rule or privilege check stands between:
 * the user whose change is recorded may not write to the audit trail, and
 * its only triggers refuse updates and deletes.
 */
static void
record_flush(AuditRecord *r)
{
	AuditTarget *t;
	TupleTableSlot *slot;
	CommandId	cid;
	ArrayType  *runs;
	Datum		events;
	List	   *recheck;
	int		   *col;

	if (r->n > 0)
	{
		t = audit_target(r->relid);
		col = t->col;
		cid = GetCurrentCommandId(true);
		slot = t->slot;
		ExecClearTuple(slot);
		memset(slot->tts_isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);
		runs = record_runs(r);
		events = events_compress(t, buffer_bytea(&r->events));
#define SET(c, d, nul) (slot->tts_values[col[c]] = (d), slot->tts_isnull[col[c]] = (nul))
		SET(ORCH_AUDIT_COL_RECORD_ID, Int64GetDatum(r->record_id), false);
		SET(ORCH_AUDIT_COL_XID, FullTransactionIdGetDatum(FullTransactionIdFromU64(r->xid)), false);
		SET(ORCH_AUDIT_COL_AT, TimestampTzGetDatum(r->at), false);
		SET(ORCH_AUDIT_COL_N_EVENTS, Int32GetDatum(r->n), false);
		SET(ORCH_AUDIT_COL_EVENTS, events, false);
		SET(ORCH_AUDIT_COL_HASHES, PointerGetDatum(buffer_bytea(&r->hashes)), false);
		SET(ORCH_AUDIT_COL_RUN_IDS, PointerGetDatum(runs), runs == NULL);
		SET(ORCH_AUDIT_COL_PURGE, BoolGetDatum(r->purge), false);
#undef SET
		ExecStoreVirtualTuple(slot);
		t->estate->es_output_cid = cid;
		table_tuple_insert(t->rel, slot, cid, 0, NULL);
		recheck = ExecInsertIndexTuples(t->rri, slot, t->estate, false, false, NULL, NIL);
		list_free(recheck);
		ExecClearTuple(slot);
		ResetPerTupleExprContext(t->estate);
		if (runs != NULL)
			pfree(runs);
		if (DatumGetPointer(events) != r->events.data)
			pfree(DatumGetPointer(events));
	}

	r->record_id = 0;
	r->n = 0;
	r->nruns = 0;
	r->stmt = 0;
	buffer_begin(&r->events);
	buffer_begin(&r->hashes);
	if (r == xact_record)
		nmarks = 0;
}

/*
 * The record the statement's next event goes to.  The transaction's, but
 * for a statement whose events go to records of their own:
 *
 * - a purge's event, which verification finds by its record;
 * - events after the transaction's record was written at commit (by
 *   another extension's pre-commit work);
 * - events of a statement of a subtransaction once the transaction's
 *   record is full.  It cannot be written then: a row the subtransaction
 *   writes goes if it rolls back, and the record holds events of the
 *   transaction's other subtransactions.  The statement's own records go
 *   with it, rightly;
 * - a statement run in the middle of another's event, and one after
 *   orch.audit_records was dropped and created again (below).
 *
 * A full record of the transaction is written at once outside any
 * subtransaction.
 */
static AuditRecord *
record_for(AuditStmt *st)
{
	if (!st->own_records)
	{
		if (xact_record == NULL)
		{
			ResourceOwner save = CurrentResourceOwner;

			/*
			 * Lock orch.audit_records now, as a write to it would, not first
			 * at commit: a session holding a stronger lock on it meanwhile
			 * waits for this transaction, not the other way round.  The
			 * lock is the transaction's, as the record is: taken in a
			 * subtransaction that rolls back, it would go with it while
			 * the record stays.
			 */
			PG_TRY();
			{
				CurrentResourceOwner = TopTransactionResourceOwner;
				LockRelationOid(st->relid, RowExclusiveLock);
			}
			PG_FINALLY();
			{
				CurrentResourceOwner = save;
			}
			PG_END_TRY();
			xact_record = record_create(TopTransactionContext, st);
		}

		/*
		 * A statement run while an event is being added to the
		 * transaction's record (by a function that rendering a value
		 * calls) must not add its own in the middle of it; nor may a
		 * statement add to a record meant for an orch.audit_records
		 * dropped since (the extension dropped and created again in this
		 * transaction).
		 */
		if (xact_record->in_event || xact_record->relid != st->relid)
			st->own_records = true;
		else if (record_full(xact_record))
		{
			if (GetCurrentTransactionNestLevel() == 1)
				record_flush(xact_record);
			else
				st->own_records = true;
		}
		if (!st->own_records)
			return xact_record;
	}
	if (st->own == NULL)
		st->own = record_create(st->cxt, st);
	else if (record_full(st->own))
		record_flush(st->own);
	return st->own;
}

/* A statement's remaining events are in: write its own record, if it has one. */
static void
stmt_end(AuditStmt *st)
{
	if (st->own != NULL)
		record_flush(st->own);
	/* after the transaction's record was written, nothing stays open into commit */
	if (xact_record_written)
		audit_target_close(false);
}

/*
 * current_user; but inside one of the orchestrator's SECURITY DEFINER
 * functions (current_user is then the owner of schema orch), the role that
 * called it, which is who the change is made for.
 */
static Oid
acting_user(void)
{
	Oid			user = GetUserId();
	HeapTuple	tp = SearchSysCache1(NAMESPACEOID,
									 ObjectIdGetDatum(get_namespace_oid("orch", false)));
	Oid			orch_owner;

	if (!HeapTupleIsValid(tp))
		return user;
	orch_owner = ((Form_pg_namespace) GETSTRUCT(tp))->nspowner;
	ReleaseSysCache(tp);
	return user == orch_owner && GetOuterUserId() != user ? GetOuterUserId() : user;
}

/*
 * Who, when and why, for every event of a statement; in the memory context
 * that lasts while its events are written.
 */
static void
stmt_begin(AuditStmt *st, const char *table_name, const char *operation)
{
	const char *actor = orch_audit_actor != NULL && orch_audit_actor[0] != '\0' ?
		orch_audit_actor : NULL;
	const char *reason = orch_audit_reason != NULL && orch_audit_reason[0] != '\0' ?
		orch_audit_reason : NULL;
	StringInfoData header;

	memset(st, 0, sizeof(*st));
	st->serial = ++stmt_serial;
	st->cxt = CurrentMemoryContext;
	st->xid = U64FromFullTransactionId(GetTopFullTransactionId());
	st->at = GetCurrentTimestamp();
	initStringInfo(&header);
	enc_u64(&header, (uint64) unix_usecs(st->at));
	enc_cstring(&header, table_name);
	enc_cstring(&header, operation);
	st->h.who = header.len;
	enc_cstring(&header, actor);
	enc_cstring(&header, GetUserNameFromId(acting_user(), false));
	enc_cstring(&header, GetUserNameFromId(GetSessionUserId(), false));
	st->h.why = header.len;
	enc_cstring(&header, reason);
	st->h.data = header.data;
	st->h.len = header.len;
	st->own_records = xact_record_written;
	st->relid = orch_relid("audit_records");
	/* the extension may have been dropped and created again since */
	if (st->relid != audit_seq_of)
	{
		audit_seq = getIdentitySequence(st->relid, 1, false);
		audit_seq_of = st->relid;
	}
}

/* A statement of the current subtransaction begins in the transaction's record. */
static void
mark_subxact(AuditRecord *r)
{
	if (nmarks == marks_cap)
	{
		int			cap = Max(8, marks_cap * 2);

		/* the capacity grows only once the memory is there */
		marks = marks == NULL ?
			MemoryContextAlloc(TopTransactionContext, sizeof(AuditMark) * cap) :
			repalloc(marks, sizeof(AuditMark) * cap);
		marks_cap = cap;
	}
	marks[nmarks].subid = GetCurrentSubTransactionId();
	marks[nmarks].events_len = r->events.len;
	marks[nmarks].n = r->n;
	marks[nmarks].nruns = r->nruns;
	nmarks++;
}

/*
 * Start an event of the statement: its row_key, old_row and new_row fields
 * are appended to the record's events next (the record returned), then
 * event_end adds its run and step.
 */
static AuditRecord *
event_begin(AuditStmt *st)
{
	AuditRecord *r;

	if (++xact_events > ORCH_AUDIT_XACT_EVENTS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("a transaction can record at most %d audit events",
						ORCH_AUDIT_XACT_EVENTS),
				 errdetail("The audit trail seals a transaction's events in one block, which keeps a 16-byte tag of each in a single value of at most 1 GB; events of savepoints rolled back count."),
				 errhint("Make the change in smaller transactions.")));
	r = record_for(st);

	if (r->stmt != st->serial)
	{
		/* the statement's first event in this record: its header first */
		if (r == xact_record && GetCurrentSubTransactionId() != TopSubTransactionId)
			mark_subxact(r);
		if (r->n == 0)
			r->at = st->at;
		put_raw(&r->events, st->h.data, st->h.len);
		r->count_at = r->events.len;
		r->count = 0;
		put_u32(&r->events, 0);
		r->stmt = st->serial;
	}
	if (r->record_id == 0)
		r->record_id = nextval_internal(audit_seq, false);
	r->event_start = r->events.len;
	r->in_event = true;
	return r;
}

/* Finish the event: its run and step, then its hash over every field. */
static void
event_end(AuditStmt *st, AuditRecord *r, const pg_uuid_t *run_id, bool has_step, int64 step_id)
{
	int			middle = r->events.len - r->event_start;
	uint8		hash[ORCH_HASH_LEN];

	if (run_id != NULL)
		enc_bytes(&r->events, run_id->data, UUID_LEN);
	else
		enc_null(&r->events);
	/* the record's runs, a run's consecutive events once */
	if (run_id != NULL &&
		(r->nruns == 0 || memcmp(&r->runs[r->nruns - 1], run_id, sizeof(pg_uuid_t)) != 0))
	{
		if (r->nruns == r->runs_cap)
		{
			r->runs = repalloc(r->runs, sizeof(pg_uuid_t) * r->runs_cap * 2);
			r->runs_cap *= 2;
		}
		r->runs[r->nruns++] = *run_id;
	}
	if (has_step)
		enc_u64(&r->events, (uint64) step_id);
	else
		enc_null(&r->events);
	orch_audit_event_hash(r->xid, &st->h, r->record_id * ORCH_AUDIT_RECORD_EVENTS + r->n,
						  r->events.data + r->event_start, middle,
						  r->events.len - r->event_start, hash);
	put_raw(&r->hashes, (const char *) hash, ORCH_HASH_LEN);
	r->count++;
	patch_u32(&r->events, r->count_at, r->count);
	r->n++;
	r->in_event = false;
}

/* Read a transition table from its start with a read pointer of our own. */
static void
transition_rescan(Tuplestorestate *ts)
{
	int			ptr = tuplestore_alloc_read_pointer(ts, EXEC_FLAG_REWIND);

	tuplestore_select_read_pointer(ts, ptr);
	tuplestore_rescan(ts);
}

/* The run and step a row belongs to: its own columns, else the running step. */
static void
row_context(const RelRender *rr, TupleTableSlot *slot, bool own, pg_uuid_t **run_id,
			bool *has_step, int64 *step_id)
{
	bool		isnull;
	Datum		d;

	*run_id = NULL;
	*has_step = false;
	*step_id = 0;
	if (own && rr->run_attr > 0)
	{
		d = slot_getattr(slot, rr->run_attr, &isnull);
		if (!isnull)
			*run_id = DatumGetUUIDP(d);
	}
	if (own && rr->step_attr > 0)
	{
		d = slot_getattr(slot, rr->step_attr, &isnull);
		if (!isnull)
		{
			*has_step = true;
			*step_id = DatumGetInt64(d);
		}
	}
	if (*run_id == NULL && !*has_step && step_context_set)
	{
		*run_id = &step_context_run;
		*has_step = true;
		*step_id = step_context_step;
	}
}

/*
 * The events of one statement on an audited table, one per row: begun
 * (audit_rows_begin), a row at a time (audit_rows_add), then ended
 * (orch_audit_rows_end).  The trigger below feeds it the statement's
 * transition tables; the engine's own writes that bypass the executor
 * (rowwrite.c) feed it each row as they write it.
 */
struct OrchAuditRows
{
	MemoryContext cxt;			/* the statement's: its header, its records */
	MemoryContext rowcxt;		/* one row's, reset for each */
	const RelRender *rr;
	RenderStmt	rs;
	AuditStmt	st;
	bool		own;
	const char *table_name;		/* schema-qualified, quoted */
	const char *operation;		/* INSERT, UPDATE, DELETE or TRUNCATE */
	int		   *changed;		/* an UPDATE's changed columns, per row (changed_columns) */
};

static OrchAuditRows *
audit_rows_begin(Relation rel, bool own, const char *operation)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit",
											  ALLOCSET_DEFAULT_SIZES);
	MemoryContext oldcxt = MemoryContextSwitchTo(cxt);
	OrchAuditRows *a = palloc0(sizeof(OrchAuditRows));
	RenderCacheEntry *render = render_for(rel);

	a->cxt = cxt;
	a->rr = render->rr;
	a->rs.rr = a->rr;
	a->rs.settings_level = 0;
	a->own = own;
	a->table_name = pstrdup(render->table_name);
	a->operation = operation;
	a->changed = palloc(sizeof(int) * Max(a->rr->ncols, 1));
	a->rowcxt = AllocSetContextCreate(cxt, "orchestrator audit row", ALLOCSET_DEFAULT_SIZES);
	stmt_begin(&a->st, a->table_name, operation);
	MemoryContextSwitchTo(oldcxt);
	return a;
}

/*
 * A row's event: for an UPDATE its version before (a) and after (b), else
 * the row inserted or deleted (a).  The slots' rows must stay as they are
 * until this returns.
 */
static void
audit_rows_add(OrchAuditRows *a, TupleTableSlot *slot_a, TupleTableSlot *slot_b)
{
	const RelRender *rr = a->rr;
	TupleTableSlot *current = slot_b != NULL ? slot_b : slot_a; /* the row as it is now, or was last */
	MemoryContext oldcxt;
	AuditRecord *r;
	int			nchanged = 0;
	pg_uuid_t  *run_id;
	bool		has_step;
	int64		step_id;

	MemoryContextReset(a->rowcxt);
	oldcxt = MemoryContextSwitchTo(a->rowcxt);
	if (slot_b != NULL)
		nchanged = changed_columns(rr, slot_a, slot_b, a->changed);
	r = event_begin(&a->st);
	if (rr->nkeys == 0)
		enc_null(&r->events);
	else
		enc_row(&r->events, &a->rs, current, rr->key_order, rr->nkeys);
	if (slot_b != NULL)
	{
		enc_row(&r->events, &a->rs, slot_a, a->changed, nchanged);
		enc_row(&r->events, &a->rs, slot_b, a->changed, nchanged);
	}
	else if (strcmp(a->operation, "INSERT") == 0)
	{
		enc_null(&r->events);
		enc_row(&r->events, &a->rs, slot_a, rr->order, rr->ncols);
	}
	else
	{
		enc_row(&r->events, &a->rs, slot_a, rr->order, rr->ncols);
		enc_null(&r->events);
	}
	row_context(rr, current, a->own, &run_id, &has_step, &step_id);
	event_end(&a->st, r, run_id, has_step, step_id);
	MemoryContextSwitchTo(oldcxt);
}

void
orch_audit_rows_end(OrchAuditRows *a)
{
	MemoryContext oldcxt = MemoryContextSwitchTo(a->cxt);

	if (a->rs.settings_level > 0)
		AtEOXact_GUC(true, a->rs.settings_level);
	stmt_end(&a->st);
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(a->cxt);
}

/* Is fn orch._audit()?  The last one found is remembered. */
static bool
is_audit_fn(Oid fn)
{
	static Oid	audit_fn = InvalidOid;
	char	   *name;
	bool		is;

	if (fn == audit_fn && OidIsValid(fn))
		return true;
	name = get_func_name(fn);
	is = name != NULL && strcmp(name, "_audit") == 0 &&
		get_func_namespace(fn) == get_namespace_oid("orch", true);
	if (is)
		audit_fn = fn;
	return is;
}

/* Is t an orch._audit() trigger of op: AFTER op FOR EACH STATEMENT? */
bool
orch_audit_trigger_of(const Trigger *t, CmdType op)
{
	return orch_trigger_of(t, op) && !TRIGGER_FOR_ROW(t->tgtype) &&
		TRIGGER_FOR_AFTER(t->tgtype) && is_audit_fn(t->tgfoid);
}

/* Does the trigger fire now, given its setting and session_replication_role? */
static bool
trigger_fires(const Trigger *t)
{
	if (SessionReplicationRole == SESSION_REPLICATION_ROLE_REPLICA)
		return t->tgenabled == TRIGGER_FIRES_ALWAYS || t->tgenabled == TRIGGER_FIRES_ON_REPLICA;
	return t->tgenabled == TRIGGER_FIRES_ALWAYS || t->tgenabled == TRIGGER_FIRES_ON_ORIGIN;
}

/*
 * The events of a statement the caller carries out on rel without the
 * executor (an UPDATE, INSERT or DELETE, as op says): begun as the table's
 * orch._audit() trigger for op would begin them, with its argument; NULL
 * when no such trigger would fire (the table is not audited, or the
 * trigger is disabled).
 */
OrchAuditRows *
orch_audit_rows_begin(Relation rel, CmdType op)
{
	TriggerDesc *td = rel->trigdesc;

	if (td == NULL)
		return NULL;
	for (int i = 0; i < td->numtriggers; i++)
	{
		const Trigger *t = &td->triggers[i];

		if (orch_audit_trigger_of(t, op) && trigger_fires(t))
			return audit_rows_begin(rel,
									t->tgnargs > 0 && strcmp(t->tgargs[0], "own") == 0,
									op == CMD_UPDATE ? "UPDATE" : op == CMD_INSERT ? "INSERT" : "DELETE");
	}
	return NULL;
}

void
orch_audit_rows_add(OrchAuditRows *a, TupleTableSlot *before, TupleTableSlot *after)
{
	Assert(strcmp(a->operation, "UPDATE") == 0 ? before != NULL && after != NULL :
		   (before == NULL) != (after == NULL));
	if (strcmp(a->operation, "UPDATE") == 0)
		audit_rows_add(a, before, after);
	else
		audit_rows_add(a, before != NULL ? before : after, NULL);
}

/*
 * orch._audit(): the AFTER ... FOR EACH STATEMENT trigger of an audited
 * table, with its transition tables.  With the argument 'own' (the
 * orchestrator's own tables), each row's run and step come from its
 * run_id and step_id columns; in business tables, from the step whose
 * function made the change.
 */
PG_FUNCTION_INFO_V1(orch_audit_trigger);
Datum
orch_audit_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Relation	rel;
	bool		own;
	const char *operation;
	Tuplestorestate *rows_a;	/* old rows (UPDATE, DELETE), else new ones */
	Tuplestorestate *rows_b;	/* new rows of an UPDATE */
	TupleTableSlot *slot_a;
	TupleTableSlot *slot_b = NULL;
	OrchAuditRows *a;
	MemoryContext oldcxt;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_AFTER(td->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("orch._audit() must be an AFTER ... FOR EACH STATEMENT trigger"),
				 errhint("Use orch.enable_audit(table) to audit a table.")));
	rel = td->tg_relation;
	own = td->tg_trigger->tgnargs > 0 && strcmp(td->tg_trigger->tgargs[0], "own") == 0;

	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		operation = "INSERT";
		rows_a = td->tg_newtable;
		rows_b = NULL;
	}
	else if (TRIGGER_FIRED_BY_UPDATE(td->tg_event))
	{
		operation = "UPDATE";
		rows_a = td->tg_oldtable;
		rows_b = td->tg_newtable;
	}
	else if (TRIGGER_FIRED_BY_DELETE(td->tg_event))
	{
		operation = "DELETE";
		rows_a = td->tg_oldtable;
		rows_b = NULL;
	}
	else
	{
		operation = "TRUNCATE";
		rows_a = rows_b = NULL;
	}
	if (strcmp(operation, "TRUNCATE") != 0 &&
		(rows_a == NULL || (strcmp(operation, "UPDATE") == 0 && rows_b == NULL)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("orch._audit() on %s needs the statement's transition tables",
						quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												   RelationGetRelationName(rel))),
				 errhint("Use orch.enable_audit(table) to audit a table.")));
	if (rows_a != NULL && tuplestore_tuple_count(rows_a) == 0)
		return PointerGetDatum(NULL);

	a = audit_rows_begin(rel, own, operation);

	if (rows_a == NULL)
	{
		/* TRUNCATE: one event, no rows */
		AuditRecord *r;

		oldcxt = MemoryContextSwitchTo(a->cxt);
		r = event_begin(&a->st);
		enc_null(&r->events);
		enc_null(&r->events);
		enc_null(&r->events);
		event_end(&a->st, r, step_context_set ? &step_context_run : NULL, step_context_set,
				  step_context_step);
		MemoryContextSwitchTo(oldcxt);
		orch_audit_rows_end(a);
		return PointerGetDatum(NULL);
	}

	/*
	 * Read in the statement's context: a tuple read back from a transition
	 * table that went to disk belongs to its slot until the next read, and
	 * the row's context is reset for every row.
	 */
	oldcxt = MemoryContextSwitchTo(a->cxt);
	slot_a = MakeSingleTupleTableSlot(a->rr->desc, &TTSOpsMinimalTuple);
	transition_rescan(rows_a);
	if (rows_b != NULL)
	{
		slot_b = MakeSingleTupleTableSlot(a->rr->desc, &TTSOpsMinimalTuple);
		transition_rescan(rows_b);
	}

	while (tuplestore_gettupleslot(rows_a, true, false, slot_a))
	{
		CHECK_FOR_INTERRUPTS();
		/* the two transition tables list an UPDATE's rows in the same order */
		if (slot_b != NULL && !tuplestore_gettupleslot(rows_b, true, false, slot_b))
			ereport(ERROR,
					(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
					 errmsg("the transition tables of an UPDATE of %s differ in length",
							a->table_name),
					 errhint("The audit trail pairs each updated row with its old version.")));
		audit_rows_add(a, slot_a, slot_b);
	}

	ExecDropSingleTupleTableSlot(slot_a);
	if (slot_b != NULL)
		ExecDropSingleTupleTableSlot(slot_b);
	MemoryContextSwitchTo(oldcxt);
	orch_audit_rows_end(a);
	return PointerGetDatum(NULL);
}

/* ------------------------------------------------------------------------
 * Reading events back
 * ------------------------------------------------------------------------ */

/* A canonical JSON value being read: bytes from p up to end. */
typedef struct Decoder
{
	const char *p;
	const char *end;
} Decoder;

static bool
get_u32(Decoder *d, uint32 *v)
{
	if (d->end - d->p < 4)
		return false;
	*v = orch_be32(d->p);
	d->p += 4;
	return true;
}

/*
 * len UTF-8 bytes at p as a NUL-terminated string of the database's
 * encoding; false for bytes that are not text of that encoding (a NUL,
 * invalid UTF-8), which the writer never stores.
 */
static bool
server_text(const char *p, uint32 len, char **out, int *outlen)
{
	char	   *c;

	if (len > MaxAllocSize / 2 || memchr(p, '\0', len) != NULL)
		return false;
	if (GetDatabaseEncoding() != PG_SQL_ASCII &&
		pg_verify_mbstr_len(PG_UTF8, p, (int) len, true) < 0)
		return false;
	if (GetDatabaseEncoding() == PG_UTF8 || GetDatabaseEncoding() == PG_SQL_ASCII)
		c = (char *) p;
	else
	{
		/*
		 * Converted without raising an error: the writer stored the
		 * database's own text, which converts back; a character the
		 * database's encoding lacks was stored by someone else.
		 */
		static Oid	proc = InvalidOid;
		Size		size = (Size) len * MAX_CONVERSION_GROWTH + 1;

		if (!OidIsValid(proc))
			proc = FindDefaultConversionProc(PG_UTF8, GetDatabaseEncoding());
		if (!OidIsValid(proc))
			c = pg_any_to_server(p, (int) len, PG_UTF8);	/* raises its error */
		else
		{
			c = MemoryContextAllocHuge(CurrentMemoryContext, size);
			if (pg_do_encoding_conversion_buf(proc, PG_UTF8, GetDatabaseEncoding(),
											  (unsigned char *) p, (int) len,
											  (unsigned char *) c, (int) Min(size, PG_INT32_MAX),
											  true) != (int) len)
			{
				pfree(c);
				return false;
			}
		}
	}
	if (c == p)
	{
		*out = palloc(len + 1);
		memcpy(*out, p, len);
		(*out)[len] = '\0';
		*outlen = (int) len;
	}
	else
	{
		*out = c;
		*outlen = (int) strlen(c);
	}
	return true;
}

/* A length and UTF-8 bytes, as a jsonb string of the database's encoding. */
static bool
get_string(Decoder *d, JsonbValue *v)
{
	uint32		len;

	if (!get_u32(d, &len) || (uint32) (d->end - d->p) < len ||
		!server_text(d->p, len, &v->val.string.val, &v->val.string.len))
		return false;
	v->type = jbvString;
	d->p += len;
	return true;
}

/*
 * The most digits a numeric holds before and after its point: numeric.c's
 * (NUMERIC_WEIGHT_MAX + 1) * DEC_DIGITS and NUMERIC_DSCALE_MAX, which it
 * keeps to itself; numeric_in raises an error past them.
 */
#define NUMERIC_INT_DIGITS_MAX	((PG_INT16_MAX + 1) * 4)
#define NUMERIC_FRAC_DIGITS_MAX	0x3FFF

/*
 * numeric_out's text: an optional minus, digits, optionally a point and
 * digits, no more of either than a numeric holds, so that numeric_in takes
 * it without an error
 */
static bool
is_number_text(const char *s, uint32 len)
{
	uint32		i = 0;
	uint32		start;

	if (i < len && s[i] == '-')
		i++;
	start = i;
	for (; i < len && isdigit((unsigned char) s[i]); i++)
		;
	if (i == start || i - start > NUMERIC_INT_DIGITS_MAX)
		return false;
	if (i < len && s[i] == '.')
	{
		start = ++i;
		for (; i < len && isdigit((unsigned char) s[i]); i++)
			;
		if (i - start > NUMERIC_FRAC_DIGITS_MAX)
			return false;
	}
	return i == len;
}

/*
 * Read one value into the jsonb being built in *st, as tok (WJB_VALUE or
 * WJB_ELEM); a value at the top is returned in *res instead.  False if the
 * bytes are not a canonical JSON value.
 */
static bool
decode_value(Decoder *d, JsonbParseState **st, JsonbIteratorToken tok, JsonbValue **res)
{
	JsonbValue	v;
	uint32		n;
	char		tag;

	check_stack_depth();
	if (d->p >= d->end)
		return false;
	tag = *d->p++;
	switch (tag)
	{
		case 'Z':
			v.type = jbvNull;
			break;
		case 'T':
		case 'F':
			v.type = jbvBool;
			v.val.boolean = tag == 'T';
			break;
		case 'S':
			if (!get_string(d, &v))
				return false;
			break;
		case 'D':
			{
				/* a timestamptz column's value: as to_jsonb writes it in UTC */
				int64		usecs;
				char		buf[MAXDATELEN + 1];

				if (d->end - d->p < 8)
					return false;
				usecs = (int64) orch_be64(d->p);
				d->p += 8;
				/* compared before the conversion, which could overflow */
				if (usecs < unix_usecs(ISO_YEARS_FROM) || usecs >= unix_usecs(ISO_YEARS_TO))
					return false;
				v.type = jbvString;
				v.val.string.len = utc_iso8601(from_unix_usecs(usecs), buf);
				v.val.string.val = pnstrdup(buf, v.val.string.len);
				break;
			}
		case 'U':
			{
				/* a uuid column's value: as its text */
				pg_uuid_t	u;

				if (d->end - d->p < UUID_LEN)
					return false;
				memcpy(u.data, d->p, UUID_LEN);
				d->p += UUID_LEN;
				v.type = jbvString;
				v.val.string.val = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(&u)));
				v.val.string.len = (int) strlen(v.val.string.val);
				break;
			}
		case 'N':
			{
				char	   *txt;

				if (!get_u32(d, &n) || (uint32) (d->end - d->p) < n || !is_number_text(d->p, n))
					return false;
				txt = pnstrdup(d->p, n);
				d->p += n;
				v.type = jbvNumeric;
				v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(txt),
																	ObjectIdGetDatum(InvalidOid),
																	Int32GetDatum(-1)));
				break;
			}
		case 'O':
		case 'A':
			if (!get_u32(d, &n))
				return false;
			*res = pushJsonbValue(st, tag == 'O' ? WJB_BEGIN_OBJECT : WJB_BEGIN_ARRAY, NULL);
			for (uint32 i = 0; i < n; i++)
			{
				if (tag == 'O')
				{
					JsonbValue	key;

					if (!get_string(d, &key))
						return false;
					(void) pushJsonbValue(st, WJB_KEY, &key);
				}
				if (!decode_value(d, st, tag == 'O' ? WJB_VALUE : WJB_ELEM, res))
					return false;
			}
			*res = pushJsonbValue(st, tag == 'O' ? WJB_END_OBJECT : WJB_END_ARRAY, NULL);
			return true;
		default:
			return false;
	}
	if (*st == NULL)
	{
		*res = palloc(sizeof(JsonbValue));
		**res = v;
	}
	else
		(void) pushJsonbValue(st, tok, &v);
	return true;
}

/* Past one value, without building it; false if malformed or nested too deep. */
static bool
skip_value(Decoder *d, int depth)
{
	uint32		n;
	uint32		len;
	char		tag;

	if (d->p >= d->end || depth > 100)
		return false;
	tag = *d->p++;
	switch (tag)
	{
		case 'Z':
		case 'T':
		case 'F':
			return true;
		case 'D':
		case 'U':
			len = tag == 'D' ? 8 : UUID_LEN;
			if ((uint32) (d->end - d->p) < len)
				return false;
			d->p += len;
			return true;
		case 'S':
		case 'N':
			if (!get_u32(d, &len) || (uint32) (d->end - d->p) < len)
				return false;
			d->p += len;
			return true;
		case 'O':
		case 'A':
			if (!get_u32(d, &n))
				return false;
			for (uint32 i = 0; i < n; i++)
			{
				/* an object's key: a length and bytes, without a tag */
				if (tag == 'O')
				{
					if (!get_u32(d, &len) || (uint32) (d->end - d->p) < len)
						return false;
					d->p += len;
				}
				if (!skip_value(d, depth + 1))
					return false;
			}
			return true;
		default:
			return false;
	}
}

/*
 * The block a PURGE event's detail names (its new_row, a canonical JSON
 * object): the value of its key purged_through_block (wherever it stands
 * among the keys), if that is a number written with digits alone that
 * fits a bigint; else -1.  Read without building jsonb, so that no stored
 * bytes can raise an error: the same rule as tools/verify-audit's and
 * docs/audit.md's.
 */
int64
orch_audit_purge_block(const OrchAuditField *detail)
{
	static const char key[] = "purged_through_block";
	Decoder		d;
	uint32		n;

	if (detail->isnull)
		return -1;
	d.p = detail->data;
	d.end = detail->data + detail->len;
	if (d.p >= d.end || *d.p++ != 'O' || !get_u32(&d, &n))
		return -1;
	for (uint32 i = 0; i < n; i++)
	{
		uint32		klen;
		uint32		len;

		if (!get_u32(&d, &klen) || (uint32) (d.end - d.p) < klen)
			return -1;
		d.p += klen;
		if (klen != sizeof(key) - 1 || memcmp(d.p - klen, key, klen) != 0)
		{
			if (!skip_value(&d, 0))
				return -1;
			continue;
		}
		if (d.p >= d.end || *d.p++ != 'N' || !get_u32(&d, &len) || (uint32) (d.end - d.p) < len)
			return -1;
		return orch_audit_digits_int64(d.p, len);
	}
	return -1;
}

/*
 * A number written with digits alone (no sign, point or exponent, at most
 * 19 of them) that fits a bigint, as a purge's block and an exported
 * digest's block_id are; else -1.
 */
int64
orch_audit_digits_int64(const char *s, size_t len)
{
	uint64		v = 0;

	if (len == 0 || len > 19)
		return -1;
	for (size_t k = 0; k < len; k++)
	{
		if (s[k] < '0' || s[k] > '9')
			return -1;
		v = v * 10 + (uint64) (s[k] - '0');
	}
	return v > (uint64) PG_INT64_MAX ? -1 : (int64) v;
}

/*
 * A JSON field of an event (row_key, old_row, new_row) as jsonb: NULL for
 * SQL NULL; *ok is set false if it is not a canonical JSON value.
 */
Jsonb *
orch_audit_decode_json(const OrchAuditField *f, bool *ok)
{
	Decoder		d;
	JsonbParseState *st = NULL;
	JsonbValue *res = NULL;

	if (f->isnull)
		return NULL;
	d.p = f->data;
	d.end = f->data + f->len;
	if (!decode_value(&d, &st, WJB_VALUE, &res) || d.p != d.end || res == NULL)
	{
		*ok = false;
		return NULL;
	}
	return JsonbValueToJsonb(res);
}

/*
 * A statement's text field (table_name, operation, actor, ...) as text:
 * (Datum) 0 with *isnull for SQL NULL; *ok set false if its bytes are not
 * text of the database's encoding as UTF-8 (a NUL, invalid UTF-8), which
 * the writer never stores.
 */
static Datum
stmt_text(const OrchAuditField *f, bool *isnull, bool *ok)
{
	char	   *c;
	int			len;

	*isnull = f->isnull;
	if (f->isnull)
		return (Datum) 0;
	if (!server_text(f->data, f->len, &c, &len))
	{
		*ok = false;
		*isnull = true;
		return (Datum) 0;
	}
	return PointerGetDatum(cstring_to_text_with_len(c, len));
}

/*
 * orch._audit_unpack(record_id, n_events, events, hashes): the events of a
 * record of orch.audit_records, one row each, with their statements' who,
 * when and why, their row images as jsonb (orch.audit_log shows them).
 */
PG_FUNCTION_INFO_V1(orch_audit_unpack);
Datum
orch_audit_unpack(PG_FUNCTION_ARGS)
{
	int64		record_id = PG_GETARG_INT64(0);
	int32		n = PG_GETARG_INT32(1);
	bytea	   *events = PG_GETARG_BYTEA_PP(2);
	bytea	   *hashes = PG_GETARG_BYTEA_PP(3);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	OrchAuditEvents ev;
	bool		hashes_ok;

	InitMaterializedSRF(fcinfo, 0);
	if (!orch_audit_split_events(VARDATA_ANY(events), (int) VARSIZE_ANY_EXHDR(events), n, &ev))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("audit record %lld does not hold the %d events it says it does",
						(long long) record_id, n),
				 errhint("orch.verify_audit() reports what was changed.")));
	hashes_ok = VARSIZE_ANY_EXHDR(hashes) == (Size) n * ORCH_HASH_LEN;
	for (int i = 0; i < n; i++)
	{
		const OrchAuditField *f = &ev.fields[i * ORCH_AUDIT_EVENT_FIELDS];
		const OrchAuditStmt *st = &ev.stmts[ev.stmt[i]];
		const OrchAuditField *at = &st->fields[ORCH_AUDIT_STMT_AT];
		/* audit_id, at, table_name, operation, row_key, old_row, new_row, actor, */
		/* db_user, session_role, run_id, step_id, reason, row_hash */
		Datum		values[14];
		bool		nulls[14];
		bool		ok = true;
		int64		audit_id = record_id * ORCH_AUDIT_RECORD_EVENTS + i;

		memset(nulls, false, sizeof(nulls));
		values[0] = Int64GetDatum(audit_id);
		ok = !at->isnull && at->len == 8;
		if (ok)
			values[1] = TimestampTzGetDatum(from_unix_usecs((int64) orch_be64(at->data)));
		else
			nulls[1] = true;
		values[2] = stmt_text(&st->fields[ORCH_AUDIT_STMT_TABLE], &nulls[2], &ok);
		values[3] = stmt_text(&st->fields[ORCH_AUDIT_STMT_OPERATION], &nulls[3], &ok);
		for (int j = 0; j < 3; j++)
		{
			Jsonb	   *jb = orch_audit_decode_json(&f[j], &ok);

			nulls[4 + j] = jb == NULL;
			values[4 + j] = PointerGetDatum(jb);
		}
		for (int j = 0; j < 3; j++)
			values[7 + j] = stmt_text(&st->fields[ORCH_AUDIT_STMT_ACTOR + j], &nulls[7 + j], &ok);
		nulls[10] = f[ORCH_AUDIT_FIELD_RUN_ID].isnull;
		if (!f[ORCH_AUDIT_FIELD_RUN_ID].isnull)
		{
			pg_uuid_t  *u = palloc0(sizeof(pg_uuid_t));

			ok = ok && f[ORCH_AUDIT_FIELD_RUN_ID].len == UUID_LEN;
			if (ok)
				memcpy(u->data, f[ORCH_AUDIT_FIELD_RUN_ID].data, UUID_LEN);
			values[10] = UUIDPGetDatum(u);
		}
		nulls[11] = f[ORCH_AUDIT_FIELD_STEP_ID].isnull;
		if (!f[ORCH_AUDIT_FIELD_STEP_ID].isnull)
		{
			ok = ok && f[ORCH_AUDIT_FIELD_STEP_ID].len == 8;
			values[11] = Int64GetDatum(ok ? (int64) orch_be64(f[ORCH_AUDIT_FIELD_STEP_ID].data) : 0);
		}
		values[12] = stmt_text(&st->fields[ORCH_AUDIT_STMT_REASON], &nulls[12], &ok);
		/* every event has a table, an operation, a user and a session's role */
		ok = ok && !nulls[2] && !nulls[3] && !nulls[8] && !nulls[9];
		if (!ok)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("audit event %lld (of record %lld) is not well formed",
							(long long) audit_id, (long long) record_id),
					 errhint("orch.verify_audit() reports what was changed.")));
		nulls[13] = !hashes_ok;
		if (hashes_ok)
		{
			bytea	   *h = palloc(VARHDRSZ + ORCH_HASH_LEN);

			SET_VARSIZE(h, VARHDRSZ + ORCH_HASH_LEN);
			memcpy(VARDATA(h), VARDATA_ANY(hashes) + (Size) i * ORCH_HASH_LEN, ORCH_HASH_LEN);
			values[13] = PointerGetDatum(h);
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * orch._audit_append_only(): refuses UPDATE, DELETE and TRUNCATE of the
 * audit tables, for every role (the trigger fires ALWAYS), but for
 * orch.purge_audit removing sealed ranges.
 */
PG_FUNCTION_INFO_V1(orch_audit_append_only);
Datum
orch_audit_append_only(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	const char *what;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "orch._audit_append_only() must be called as a trigger");
	if (orch_audit_purging && TRIGGER_FIRED_BY_DELETE(td->tg_event))
		return PointerGetDatum(NULL);
	what = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? "UPDATE" :
		TRIGGER_FIRED_BY_DELETE(td->tg_event) ? "DELETE" : "TRUNCATE";
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("%s of %s is not allowed: the audit trail is append-only", what,
					quote_qualified_identifier(get_namespace_name(RelationGetNamespace(td->tg_relation)),
											   RelationGetRelationName(td->tg_relation))),
			 errhint("Sealed ranges can be removed with orch.purge_audit, which keeps their block hashes.")));
	PG_RETURN_NULL();
}

/*
 * orch._audit_event(table_name, operation, detail): an audit row for an
 * event that changes no row of its own (enabling or disabling the audit
 * of a table, a purge); detail goes in new_row.
 */
PG_FUNCTION_INFO_V1(orch_audit_event);
Datum
orch_audit_event(PG_FUNCTION_ARGS)
{
	AuditStmt	st;
	AuditRecord *r;
	MemoryContext cxt;
	MemoryContext oldcxt;
	Jsonb	   *detail;
	const char *table_name;
	const char *operation;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("an audit event needs a table name and an operation")));
	cxt = AllocSetContextCreate(CurrentMemoryContext, "orchestrator audit",
								ALLOCSET_DEFAULT_SIZES);
	oldcxt = MemoryContextSwitchTo(cxt);
	table_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	operation = text_to_cstring(PG_GETARG_TEXT_PP(1));
	stmt_begin(&st, table_name, operation);
	/* a purge's event is a record of its own, which verification reads first */
	st.purge = strcmp(table_name, ORCH_AUDIT_PURGE_TABLE) == 0 &&
		strcmp(operation, ORCH_AUDIT_PURGE_OPERATION) == 0;
	st.own_records = st.own_records || st.purge;
	detail = PG_ARGISNULL(2) ? NULL : PG_GETARG_JSONB_P(2);
	r = event_begin(&st);
	enc_null(&r->events);
	enc_null(&r->events);
	enc_jsonb(&r->events, detail);
	event_end(&st, r, step_context_set ? &step_context_run : NULL, step_context_set,
			  step_context_step);
	stmt_end(&st);
	MemoryContextSwitchTo(oldcxt);
	MemoryContextDelete(cxt);
	PG_RETURN_VOID();
}
