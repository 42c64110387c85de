//! `coordctl agents|capacity|alloc|optimize …`: the allocator's operations.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use common::msg::{
    AdjustRequest, AllocateRequest, Allocation, CancelReservation, CapacityRequest, CapacityStatus,
    GangRequest, OptimizeRequest, Policy, QuotaRequest, QuotaStatus, ReleaseRequest, RenewRequest,
    Requirements, ReserveRequest, ResourceCapacity,
};
use common::{AgentId, AllocationId, Error, ErrorCode, ReservationId};

use super::{id, parse_amount, parse_pair, parse_wire, table, Ctx, Negative};

#[derive(Subcommand, Debug)]
pub(crate) enum AgentsCmd {
    /// Every registered agent with its status and per-resource capacity.
    List,
    /// An agent leaves: it drains (keeps its allocations, takes no new ones).
    Deregister { agent_id: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CapacityCmd {
    /// Capacity, allocations, reservations and free amounts per resource, agent and label.
    Show,
    /// Whether a requirement fits now, on which agents, and if not, why. Exits 3 when it does not fit.
    Check {
        #[command(flatten)]
        req: ReqArgs,
        /// Count reservations held for this owner (or a parent of it) as available.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Hold capacity for an owner over a time window.
    Reserve {
        /// Who may draw from the reservation (and owners below it, `team` serves `team/x`).
        #[arg(long)]
        owner: String,
        #[command(flatten)]
        req: ReqArgs,
        /// Start of the window, ms since the epoch (default: now).
        #[arg(long)]
        start_ms: Option<u64>,
        /// End of the window, ms since the epoch.
        #[arg(
            long,
            conflicts_with = "duration_ms",
            required_unless_present = "duration_ms"
        )]
        end_ms: Option<u64>,
        /// Length of the window in ms (instead of --end-ms).
        #[arg(long)]
        duration_ms: Option<u64>,
        /// Reserve on this agent rather than the best fit.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Cancel a reservation (idempotent).
    Unreserve {
        reservation_id: String,
        #[arg(long)]
        agent: Option<String>,
    },
    /// Set an agent's capacity for the named resources.
    Adjust {
        agent_id: String,
        /// New amount, `resource=amount` (repeatable).
        #[arg(long = "resource", short = 'r', value_parser = parse_amount, required = true)]
        resources: Vec<(String, f64)>,
        /// Release allocations that no longer fit (lowest priority, newest first);
        /// without it nothing changes and the reply lists them.
        #[arg(long)]
        preempt: bool,
    },
    /// Cap what an owner (and every owner below it) may hold across the pool.
    Quota {
        owner: String,
        /// Most the owner may hold, `resource=amount` (repeatable).
        #[arg(long = "limit", short = 'l', value_parser = parse_amount, required_unless_present = "clear")]
        limits: Vec<(String, f64)>,
        /// Remove the owner's quota.
        #[arg(long, conflicts_with = "limits")]
        clear: bool,
        /// Release the owner's allocations beyond the new limits (lowest
        /// priority, newest first); without it nothing changes and the reply
        /// lists them.
        #[arg(long)]
        preempt: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum AllocCmd {
    /// Book capacity on the best agent for a requirement.
    Allocate {
        #[arg(long)]
        owner: String,
        #[command(flatten)]
        req: ReqArgs,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Caller-chosen id, making a retried request idempotent.
        #[arg(long)]
        allocation_id: Option<String>,
        /// A lease, in ms: the allocation is taken back unless renewed
        /// (`alloc renew`) within it. Without one it is held until released.
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    /// Extend an allocation's lease from now.
    Renew {
        allocation_id: String,
        /// The new lease, in ms; default the allocation's own.
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    /// Place several requirements all-or-nothing, from a YAML or JSON file (`-` reads
    /// stdin): `{"owner", "members": [requirements], "priority"}`.
    Gang { file: String },
    /// Release an allocation (idempotent).
    Release {
        allocation_id: String,
        #[arg(long)]
        agent: Option<String>,
    },
}

#[derive(Args, Debug)]
pub(crate) struct OptimizeArgs {
    /// Make the moves rather than only planning them.
    #[arg(long)]
    apply: bool,
    /// At most this many moves.
    #[arg(long)]
    max_moves: Option<usize>,
}

/// A requirement from the command line.
#[derive(Args, Debug)]
pub(crate) struct ReqArgs {
    /// A resource amount, `resource=amount` (repeatable), e.g. `-r cpu=2`.
    #[arg(long = "resource", short = 'r', value_parser = parse_amount)]
    resources: Vec<(String, f64)>,
    /// A capability the agent must have (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// A label the agent must carry, `name=value` (repeatable).
    #[arg(long = "label", value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Placement policy: best_fit (pack) or spread.
    #[arg(long, value_parser = parse_wire::<Policy>)]
    policy: Option<Policy>,
    /// Never share an agent with another allocation of this group.
    #[arg(long)]
    anti_affinity: Option<String>,
    /// The optimiser may move this allocation.
    #[arg(long)]
    movable: bool,
}

impl ReqArgs {
    fn requirements(&self) -> Requirements {
        Requirements {
            resources: self.resources.iter().cloned().collect(),
            capabilities: self.capabilities.clone(),
            labels: self.labels.iter().cloned().collect(),
            policy: self.policy.unwrap_or_default(),
            anti_affinity: self.anti_affinity.clone(),
            movable: self.movable,
        }
    }
}

pub(crate) async fn run_agents(ctx: &Ctx, cmd: AgentsCmd) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::List => {
            let cap = ctx.client.capacity(&CapacityRequest::default()).await?;
            let agents = agent_rows(&cap);
            ctx.emit(&agents, |agents| {
                let rows = agents
                    .iter()
                    .map(|a| {
                        vec![
                            a.agent_id.to_string(),
                            a.status.clone(),
                            resources_text(&a.resources),
                        ]
                    })
                    .collect();
                table(&["agent", "status", "resources (allocated/capacity)"], rows)
            });
        }
        AgentsCmd::Deregister { agent_id } => {
            let info = ctx
                .client
                .deregister_agent(&id::<AgentId>(&agent_id)?)
                .await?;
            ctx.emit(&info, |i| {
                format!("{} is {}", i.agent_id, super::wire_name(&i.status))
            });
        }
    }
    Ok(())
}

/// One agent as `agents list` shows it.
#[derive(serde::Serialize)]
struct AgentRow {
    agent_id: AgentId,
    status: String,
    resources: BTreeMap<String, ResourceCapacity>,
}

fn agent_rows(cap: &CapacityStatus) -> Vec<AgentRow> {
    let mut ids: Vec<&AgentId> = cap.agents.keys().chain(cap.agent_status.keys()).collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .map(|a| AgentRow {
            agent_id: a.clone(),
            status: cap
                .agent_status
                .get(a)
                .map(super::wire_name)
                .unwrap_or_else(|| "active".into()),
            resources: cap.agents.get(a).cloned().unwrap_or_default(),
        })
        .collect()
}

fn resources_text(r: &BTreeMap<String, ResourceCapacity>) -> String {
    r.iter()
        .map(|(name, c)| format!("{name} {}/{}", amount(c.allocated), amount(c.capacity)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An amount as people read it: sums of releases can leave `-0`, which is 0.
fn amount(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        x.to_string()
    }
}

fn capacity_text(cap: &CapacityStatus) -> String {
    let rows = cap
        .pool
        .iter()
        .map(|(r, c)| {
            vec![
                r.clone(),
                amount(c.capacity),
                amount(c.allocated),
                amount(c.reserved),
                amount(c.free),
            ]
        })
        .collect();
    let mut out = table(
        &["resource", "capacity", "allocated", "reserved", "free"],
        rows,
    );
    if let Some(fits) = cap.fits {
        out.push_str(&format!(
            "\nfits: {fits}; candidates: {}",
            cap.candidates
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if let Some(no_fit) = &cap.no_fit {
            out.push_str(&format!("\nwhy not: {}", no_fit.message));
        }
    }
    if !cap.quotas.is_empty() {
        out.push_str("\n\n");
        out.push_str(&quota_table(&cap.quotas));
    }
    out
}

fn quota_table(quotas: &BTreeMap<String, QuotaStatus>) -> String {
    let mut rows = Vec::new();
    for (owner, q) in quotas {
        for (r, limit) in &q.limits {
            rows.push(vec![
                owner.clone(),
                r.clone(),
                amount(*limit),
                amount(q.used.get(r).copied().unwrap_or(0.0)),
                q.allocations.to_string(),
            ]);
        }
    }
    table(
        &["quota owner", "resource", "limit", "used", "allocations"],
        rows,
    )
}

fn now_ms() -> u64 {
    common::now_ms()
}

pub(crate) async fn run_capacity(ctx: &Ctx, cmd: CapacityCmd) -> anyhow::Result<()> {
    let c = &ctx.client;
    match cmd {
        CapacityCmd::Show => {
            let cap = c.capacity(&CapacityRequest::default()).await?;
            ctx.emit(&cap, capacity_text);
        }
        CapacityCmd::Check { req, owner } => {
            let cap = c
                .capacity(&CapacityRequest {
                    requirements: Some(req.requirements()),
                    owner,
                })
                .await?;
            ctx.emit(&cap, capacity_text);
            if cap.fits == Some(false) {
                return Err(Negative("the requirement does not fit".into()).into());
            }
        }
        CapacityCmd::Reserve {
            owner,
            req,
            start_ms,
            end_ms,
            duration_ms,
            agent,
        } => {
            let start_ms = start_ms.unwrap_or_else(now_ms);
            let end_ms = match (end_ms, duration_ms) {
                (Some(end), _) => end,
                (None, Some(d)) => start_ms.saturating_add(d),
                (None, None) => {
                    return Err(
                        Error::new(ErrorCode::BadRequest, "give --end-ms or --duration-ms").into(),
                    )
                }
            };
            let agent_id = agent.as_deref().map(id::<AgentId>).transpose()?;
            let r = c
                .reserve(&ReserveRequest {
                    owner,
                    requirements: req.requirements(),
                    start_ms,
                    end_ms,
                    agent_id,
                })
                .await?;
            ctx.emit(&r, |r| {
                format!(
                    "reservation {} on {} for {}: [{}, {})",
                    r.reservation_id, r.agent_id, r.owner, r.start_ms, r.end_ms
                )
            });
        }
        CapacityCmd::Unreserve {
            reservation_id,
            agent,
        } => {
            let reply = c
                .cancel_reservation(&CancelReservation {
                    reservation_id: id::<ReservationId>(&reservation_id)?,
                    agent_id: agent.as_deref().map(id::<AgentId>).transpose()?,
                })
                .await?;
            ctx.emit(&reply, |r| {
                format!(
                    "cancelled: {}; {} allocations released",
                    r.cancelled,
                    r.released.len()
                )
            });
        }
        CapacityCmd::Adjust {
            agent_id,
            resources,
            preempt,
        } => {
            let reply = c
                .adjust_capacity(&AdjustRequest {
                    agent_id: id::<AgentId>(&agent_id)?,
                    capacity: resources.into_iter().collect(),
                    preempt,
                })
                .await?;
            ctx.emit(&reply, |r| {
                let ids = |v: &[common::msg::Allocation]| {
                    v.iter()
                        .map(|a| a.allocation_id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if r.applied {
                    format!(
                        "capacity of {agent_id} is now {:?}; preempted: [{}]",
                        r.capacity,
                        ids(&r.preempted)
                    )
                } else {
                    format!(
                        "not applied: allocations no longer fit: [{}] (use --preempt)",
                        ids(&r.no_longer_fit)
                    )
                }
            });
        }
        CapacityCmd::Quota {
            owner,
            limits,
            clear,
            preempt,
        } => {
            let reply = c
                .set_quota(&QuotaRequest {
                    owner,
                    limits: if clear {
                        BTreeMap::new()
                    } else {
                        limits.into_iter().collect()
                    },
                    preempt,
                })
                .await?;
            ctx.emit(&reply, |r| {
                let ids = r
                    .no_longer_fit
                    .iter()
                    .map(|a| a.allocation_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                match (&r.quota, r.applied) {
                    (None, true) => format!("{} has no quota", r.owner),
                    (Some(q), true) => format!(
                        "{}\npreempted: [{}]",
                        quota_table(&[(r.owner.clone(), q.clone())].into()),
                        r.preempted
                            .iter()
                            .map(|a| a.allocation_id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    (_, false) => format!(
                        "not applied: allocations beyond the limits: [{ids}] (use --preempt)"
                    ),
                }
            });
        }
    }
    Ok(())
}

/// One allocation in a line, with when its lease ends if it has one.
fn describe(a: &Allocation) -> String {
    let lease = match a.expires_at_ms {
        Some(end) => format!(
            ", lease ends in {} ms",
            end.saturating_sub(common::now_ms())
        ),
        None => String::new(),
    };
    format!(
        "allocation {} on {} for {}: {:?}{lease}",
        a.allocation_id, a.agent_id, a.owner, a.resources
    )
}

pub(crate) async fn run_alloc(ctx: &Ctx, cmd: AllocCmd) -> anyhow::Result<()> {
    let c = &ctx.client;
    match cmd {
        AllocCmd::Allocate {
            owner,
            req,
            priority,
            allocation_id,
            ttl_ms,
        } => {
            // The allocator takes an empty requirement (a task that needs only an
            // agent); from the command line it is a forgotten -r that would book `{}`.
            if req.resources.is_empty() {
                return Err(Error::new(
                    ErrorCode::ValidationFailed,
                    "an allocation needs at least one resource: -r name=amount",
                )
                .into());
            }
            let a = c
                .allocate(&AllocateRequest {
                    owner,
                    requirements: req.requirements(),
                    priority,
                    allocation_id: allocation_id
                        .as_deref()
                        .map(id::<AllocationId>)
                        .transpose()?,
                    deadline_ms: None,
                    task: None,
                    ttl_ms,
                })
                .await?;
            ctx.emit(&a, describe);
        }
        AllocCmd::Renew {
            allocation_id,
            ttl_ms,
        } => {
            let a = c
                .renew(&RenewRequest {
                    allocation_id: id::<AllocationId>(&allocation_id)?,
                    ttl_ms,
                })
                .await?;
            ctx.emit(&a, describe);
        }
        AllocCmd::Gang { file } => {
            let arg = if file == "-" {
                file
            } else {
                format!("@{file}")
            };
            let req: GangRequest = serde_yaml::from_str(&super::read_arg(&arg)?)
                .map_err(|e| Error::bad_request(format!("the gang request is not valid: {e}")))?;
            let reply = c.allocate_gang(&req).await?;
            ctx.emit(&reply, |g| {
                let rows = g
                    .allocations
                    .iter()
                    .map(|a| {
                        vec![
                            a.allocation_id.to_string(),
                            a.agent_id.to_string(),
                            format!("{:?}", a.resources),
                        ]
                    })
                    .collect();
                format!(
                    "gang {}\n{}",
                    g.gang_id,
                    table(&["allocation", "agent", "resources"], rows)
                )
            });
        }
        AllocCmd::Release {
            allocation_id,
            agent,
        } => {
            let r = c
                .release(&ReleaseRequest {
                    allocation_id: id::<AllocationId>(&allocation_id)?,
                    agent_id: agent.as_deref().map(id::<AgentId>).transpose()?,
                })
                .await?;
            ctx.emit(&r, |r| format!("released: {}", r.released));
        }
    }
    Ok(())
}

pub(crate) async fn run_optimize(ctx: &Ctx, args: OptimizeArgs) -> anyhow::Result<()> {
    let plan = ctx
        .client
        .optimize(&OptimizeRequest {
            apply: args.apply,
            max_moves: args.max_moves,
        })
        .await?;
    ctx.emit(&plan, |p| {
        let rows = p
            .moves
            .iter()
            .map(|m| {
                vec![
                    m.allocation_id.to_string(),
                    m.owner.clone(),
                    m.from.to_string(),
                    m.to.to_string(),
                    if p.applied.contains(&m.allocation_id) {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                ]
            })
            .collect();
        format!(
            "{}\nutilisation max {:.2} -> {:.2}, stddev {:.2} -> {:.2}",
            table(&["allocation", "owner", "from", "to", "applied"], rows),
            p.before.max,
            p.after.max,
            p.before.stddev,
            p.after.stddev
        )
    });
    Ok(())
}
