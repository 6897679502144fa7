"""`recover system|failover|ransomware|rollback|services|drill`: the whole-system scenarios, as the
Launchpad launches them; `--plan` prints the steps they would take (the runbook page, computed)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from dr_pipelines.cli.common import EXIT_FAILED, EXIT_OK, config_from_args, log, open_cli_locations


def add_recover_parser(sub) -> None:
    r = sub.add_parser("recover", help="whole-system recovery: system, failover, ransomware, rollback, services, drill")
    rsub = r.add_subparsers(dest="recover_command", required=True, metavar="SCENARIO")

    def system_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--into", required=True, metavar="DIR", help="a new or empty target directory (target_root)")
        p.add_argument("--at", metavar="TS", help="the recovery point, ISO 8601 with a time zone (default: newest)")
        p.add_argument("--db", action="append", metavar="DB", help="only this database (repeat); default: all")
        p.add_argument("--file-set", action="append", metavar="SET", help="only this file set (repeat); default: all")
        p.add_argument("--method", choices=["auto", "pitr", "logical"], default="auto")
        p.add_argument("--files-in-place", action="store_true", help="files to their original (empty) paths")
        p.add_argument("--no-services", action="store_true", help="do not start the services")
        p.add_argument("--accept-gaps", action="store_true", help="recover to the last point before a WAL gap")
        p.add_argument("--plan", action="store_true", help="print the steps it would take, and touch nothing")

    s = rsub.add_parser("system", help="rebuild the whole system onto an empty host or target (full_system_recovery)")
    system_options(s)
    s.add_argument("--location", action="append", metavar="NAME", help="read only this location (repeat)")
    s.set_defaults(func=cmd_recover_system)

    f = rsub.add_parser("failover", help="rebuild from the first reachable location that covers the request")
    system_options(f)
    f.set_defaults(func=cmd_recover_failover)

    w = rsub.add_parser("ransomware", help="quarantine, then the last known good point into fresh targets")
    w.add_argument("--into", required=True, metavar="DIR", help="a NEW target directory")
    w.add_argument("--incident-time", metavar="TS", help="when the attack began (default: now minus --lookback)")
    w.add_argument("--lookback", default="24h", metavar="DURATION", help="with no --incident-time (default 24h)")
    w.add_argument("--db", action="append", metavar="DB", help="an affected database (repeat); default: all")
    w.add_argument("--file-set", action="append", metavar="SET", help="an affected file set (repeat); default: all")
    w.add_argument("--method", choices=["auto", "pitr", "logical"], default="auto")
    w.add_argument("--start-services", action="store_true", help="start the services on the restored data")
    w.add_argument("--plan", action="store_true", help="print the last good point and steps; touch nothing")
    w.set_defaults(func=cmd_recover_ransomware)

    b = rsub.add_parser("rollback", help="roll one service back to before a deployment (service_rollback)")
    b.add_argument("service", metavar="SERVICE")
    b.add_argument("--before", required=True, metavar="TS", help="a moment before the deployment (with a time zone)")
    b.add_argument("--with-database", action="store_true", help="also restore its databases to that point")
    b.add_argument("--yes", metavar="SERVICE", help="the service's name again, to confirm")
    b.add_argument("--plan", action="store_true", help="print what it would restore and replace; touch nothing")
    b.set_defaults(func=cmd_recover_rollback)

    v = rsub.add_parser("services", help="start services in dependency order, each waiting for its health checks")
    v.add_argument("services", nargs="*", metavar="SERVICE", help="default: all")
    v.set_defaults(func=cmd_recover_services)

    d = rsub.add_parser("drill", help="the full-system drill into scratch targets, now (full_system_drill)")
    d.set_defaults(func=cmd_recover_drill)


def _system_options(args) -> dict:
    return {
        "target_root": args.into,
        "point_in_time": args.at,
        "databases": args.db,
        "file_sets": args.file_set,
        "method": args.method,
        "files_in_place": args.files_in_place,
        "start_services": not args.no_services,
        "accept_gaps": args.accept_gaps,
    }


def _print_report(report) -> int:
    print(json.dumps(report.to_dict() if hasattr(report, "to_dict") else asdict(report), indent=2, default=str))
    if hasattr(report, "summary_markdown"):
        log(report.summary_markdown())
    return EXIT_OK if report.passed else EXIT_FAILED


def _run(args, job: str, first_op: str, options: dict) -> int:
    from dr_pipelines.defs.recovery.definitions import build_recovery_definitions
    from dr_pipelines.defs.runner import run_job

    config = config_from_args(args)
    result = run_job(
        config, args.config, job, {"ops": {first_op: {"config": options}}}, domain=build_recovery_definitions
    )
    return _print_report(result.output_for_node("recovery_report"))


def _plan(args, scenario: str, options: dict) -> int:
    from dr_pipelines.core.recovery.failover import choose_failover
    from dr_pipelines.core.recovery.plan import make_plan, preflight
    from dr_pipelines.defs.recovery.jobs import FailoverConfig, FullSystemConfig

    config = config_from_args(args)
    locations = open_cli_locations(config)
    if scenario == "cross_region_failover":
        plan = choose_failover(config, locations, FailoverConfig(**options).plan_request(), log)
    else:
        chosen = FullSystemConfig(**options)
        plan = make_plan(config, locations, scenario, chosen.plan_request(chosen.locations), log)
    preflight(config, plan, options["files_in_place"])
    print(plan.describe())
    return EXIT_OK


def cmd_recover_system(args) -> int:
    options = {**_system_options(args), "locations": args.location}
    if args.plan:
        return _plan(args, "full_system_recovery", options)
    return _run(args, "full_system_recovery", "plan_full_system_recovery", options)


def cmd_recover_failover(args) -> int:
    options = _system_options(args)
    if args.plan:
        return _plan(args, "cross_region_failover", options)
    return _run(args, "cross_region_failover", "choose_failover_location", options)


def cmd_recover_ransomware(args) -> int:
    options = {
        "target_root": args.into,
        "incident_time": args.incident_time,
        "lookback": args.lookback,
        "databases": args.db,
        "file_sets": args.file_set,
        "method": args.method,
        "start_services": args.start_services,
    }
    if args.plan:
        from pathlib import Path

        from dr_pipelines.core.config import parse_duration
        from dr_pipelines.core.pitr.recover import parse_target_time
        from dr_pipelines.core.recovery.plan import PlanRequest, make_plan
        from dr_pipelines.core.recovery.ransomware import incident_time, judge_last_good

        config = config_from_args(args)
        locations = open_cli_locations(config)
        when = incident_time(
            parse_target_time(args.incident_time) if args.incident_time else None, parse_duration(args.lookback)
        )
        request = PlanRequest(
            Path(args.into),
            at=when - config.recovery.incident_margin,
            databases=args.db,
            file_sets=args.file_set,
            method=args.method,
            database_suffix="_recovered_<time>",
            start_services=args.start_services,
        )
        plan = make_plan(config, locations, "ransomware_recovery", request, log, judge_last_good(config, locations))
        print("0. quarantine the compromised data (hashed, read-only) into " + config.recovery.quarantine_dir)
        print(plan.describe())
        return EXIT_OK
    return _run(args, "ransomware_recovery", "quarantine_and_choose_last_good", options)


def cmd_recover_rollback(args) -> int:
    from dr_pipelines.defs.recovery.definitions import build_recovery_definitions
    from dr_pipelines.defs.runner import run_job

    config = config_from_args(args)
    config.service(args.service)
    if args.plan:
        from dr_pipelines.core.pitr.recover import parse_target_time
        from dr_pipelines.core.recovery.rollback import plan_rollback

        plan = plan_rollback(
            config, open_cli_locations(config), args.service, parse_target_time(args.before), args.with_database
        )
        print(plan.describe())
        return EXIT_OK
    options = {
        "service": args.service,
        "before": args.before,
        "with_database": args.with_database,
        "confirm": args.yes or "",
    }
    result = run_job(
        config,
        args.config,
        "service_rollback",
        {"ops": {"roll_back_service": {"config": options}}},
        domain=build_recovery_definitions,
    )
    report = result.output_for_node("rollback_report")
    print(json.dumps(asdict(report), indent=2, default=str))
    return EXIT_OK


def cmd_recover_services(args) -> int:
    from dr_pipelines.core.recovery.services import start_services

    config = config_from_args(args)
    for name in args.services:
        config.service(name)
    outcomes = start_services(config, args.services or list(config.services), log)
    print(json.dumps([asdict(o) for o in outcomes], indent=2))
    return EXIT_OK


def cmd_recover_drill(args) -> int:
    from dr_pipelines.defs.recovery.definitions import build_recovery_definitions
    from dr_pipelines.defs.runner import run_job

    config = config_from_args(args)
    result = run_job(config, args.config, "full_system_drill", domain=build_recovery_definitions)
    return _print_report(result.output_for_node("full_system_drill_op"))
