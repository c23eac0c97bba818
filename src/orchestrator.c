/*-------------------------------------------------------------------------
 * orchestrator.c
 *	  Module load: settings, shared memory hooks, the launcher registration
 *	  and the utility hook that moves engine workers out of the way of
 *	  DROP DATABASE and CREATE DATABASE ... TEMPLATE.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/ipc.h"
#include "tcop/utility.h"
#include "utils/guc.h"

#include "orchestrator.h"
#include "audit.h"

PG_MODULE_MAGIC;

bool		orch_enabled = true;
int			orch_workers_per_database = 1;
int			orch_batch_size = 200;
int			orch_max_sleep_ms = 10000;
int			orch_launcher_naptime_s = 10;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;

void		_PG_init(void);

static void
orch_shmem_request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	orch_shmem_request();
}

static void
orch_shmem_startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	orch_shmem_startup();
}

/*
 * An engine worker stays connected to its database, which would make
 * DROP DATABASE, and CREATE DATABASE from it as a template, fail with
 * "being accessed by other users".  Ask the workers to leave first; the
 * launcher starts them again later if the database is still there.
 */
static void
orch_process_utility(PlannedStmt *pstmt, const char *queryString,
					 bool readOnlyTree, ProcessUtilityContext context,
					 ParamListInfo params, QueryEnvironment *queryEnv,
					 DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	orch_audit_before_utility();
	if (OrchShared != NULL)
	{
		if (IsA(parsetree, DropdbStmt))
		{
			Oid			dboid = get_database_oid(((DropdbStmt *) parsetree)->dbname, true);

			if (OidIsValid(dboid))
				orch_stop_engines_for_database(dboid);
		}
		else if (IsA(parsetree, CreatedbStmt))
		{
			ListCell   *lc;

			foreach(lc, ((CreatedbStmt *) parsetree)->options)
			{
				DefElem    *def = lfirst_node(DefElem, lc);

				if (strcmp(def->defname, "template") == 0 && def->arg != NULL)
				{
					Oid			dboid = get_database_oid(defGetString(def), true);

					if (OidIsValid(dboid))
						orch_stop_engines_for_database(dboid);
				}
			}
		}
	}

	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context,
							params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);

	/* a new database may have been created from a template with the extension */
	if (OrchShared != NULL && IsA(parsetree, CreatedbStmt))
		orch_wake_launcher(true);
}

void
_PG_init(void)
{
	DefineCustomBoolVariable("orchestrator.enabled",
							 "Whether engine workers advance runs.",
							 "When off, the workers stay connected but idle; orch.tick() still works.",
							 &orch_enabled, true, PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("orchestrator.workers_per_database",
							"Engine workers started for each database that has the extension.",
							NULL,
							&orch_workers_per_database, 1, 1, ORCH_MAX_WORKERS_PER_DB,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("orchestrator.batch_size",
							"Most steps an engine worker advances in one transaction.",
							NULL,
							&orch_batch_size, 200, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("orchestrator.max_sleep",
							"Longest an idle engine worker sleeps before looking for work.",
							"Workers are woken on the commit that makes work ready and at the "
							"earliest timer; this bounds the sleep for anything else.",
							&orch_max_sleep_ms, 10000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("orchestrator.launcher_naptime",
							"How often the launcher looks for databases that gained the extension.",
							NULL,
							&orch_launcher_naptime_s, 10, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("orchestrator.audit_actor",
							   "The application's actor, recorded with every audited change.",
							   "Usually set for one transaction, with orch.set_audit_context().",
							   &orch_audit_actor, "", PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("orchestrator.audit_reason",
							   "Why the changes are made, recorded with every audited change.",
							   "Usually set for one transaction, with orch.set_audit_context().",
							   &orch_audit_reason, "", PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("orchestrator.audit_seal_interval",
							"How often the sealer seals finished audit rows into a block.",
							NULL,
							&orch_audit_seal_interval_ms, 500, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("orchestrator.audit_heartbeat",
							"How often the sealer writes an empty block when there is nothing to seal.",
							"Empty blocks show that sealing is alive.",
							&orch_audit_heartbeat_s, 60, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	MarkGUCPrefixReserved("orchestrator");

	orch_register_xact_callback();

	/*
	 * Also when loaded on demand (by an audit trigger): the audit trail
	 * closes what it keeps open before any utility statement.
	 */
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = orch_process_utility;
	/* the engine's statements are planned with settings of their own */
	orch_planner_install();
	orch_audit_register_callbacks();

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = orch_shmem_request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = orch_shmem_startup_hook;

	orch_launcher_register();
}
