<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{{refresh_s}}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dynamic-workload{{" (details)" if detailed else ""}}</title>
<style>
  body { font: 13px/1.4 "DejaVu Sans", Arial, sans-serif; margin: 12px 16px; color: #1a202c; background: #f7fafc; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 0 0 8px; }
  h3 { font-size: 13px; margin: 12px 0 4px; color: #4a5568; }
  .sub { color: #4a5568; margin-bottom: 12px; }
  .endpoints { display: flex; flex-wrap: wrap; gap: 16px; }
  .endpoint { background: #fff; border: 1px solid #e2e8f0; border-radius: 6px; padding: 12px; width: 626px; box-sizing: border-box; }
  .down { color: #c53030; }
  .counts { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 6px; }
  .count { border: 1px solid #e2e8f0; border-radius: 4px; padding: 3px 6px; flex: 1; font-size: 11px; }
  .count b { display: block; font-size: 17px; }
  .count.alert { border-color: #c53030; color: #c53030; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 2px 4px; border-bottom: 1px solid #edf2f7; vertical-align: top; }
  td.n, th.n { text-align: right; white-space: nowrap; }
  td.reason { text-align: left; font-size: 12px; color: #4a5568; border-bottom: 1px solid #e2e8f0; padding-bottom: 4px; }
  tr.run td { border-bottom: none; }
  .error { color: #c53030; font-size: 12px; word-break: break-all; }
  .chart { display: block; margin: 4px 0; }
  .chart-title { font-size: 11px; fill: #2d3748; }
  .legend, .axis { font-size: 10px; fill: #4a5568; }
  .grid { stroke: #e2e8f0; stroke-width: 1; }
  .breaker-open { color: #c53030; font-weight: bold; }
  a { color: #2b6cb0; }
</style>
</head>
<body>
<h1>dynamic-workload</h1>
<div class="sub">{{generated}} · reloads every {{refresh_s}} s ·
% if detailed:
operator view (worker ids, errors, failed items) · <a href="/">public view</a>
% else:
public view: counts only · <a href="/details">details</a> (operator key)
% end
</div>
<div class="endpoints">
% for view in endpoints:
<section class="endpoint" id="endpoint-{{view['node']}}">
% if 'error' in view:
  <h2>endpoint {{view['node']}}</h2>
  <p class="down" data-state="down">{{view['error']}}</p>
% else:
% counts = view['counts']
  <h2>endpoint {{view['node']}}</h2>
  <div class="counts">
% for key, label in (('pending', 'pending'), ('running', 'running'), ('completed', 'completed'), ('failed', 'failed'), ('undelivered', 'undelivered'), ('workers_heard_from', 'workers heard from')):
    <div class="count{{' alert' if key == 'failed' and counts[key] else ''}}" data-count="{{key}}"><b>{{counts[key]}}</b>{{label}}</div>
% end
    <div class="count" data-count="oldest_pending_age_s"><b>{{seconds(counts['oldest_pending_age_s']) if counts['pending'] else '–'}}</b>oldest pending</div>
  </div>
% if counts['disk_full']:
  <p class="down">the disk of this endpoint is full: writes are refused (507)</p>
% end
% for name in ('hour', 'day'):
  <h3>last {{name}}</h3>
  {{!view['charts']['throughput_' + name]}}
  {{!view['charts']['backlog_' + name]}}
  {{!view['charts']['workers_' + name]}}
% end
  <h3>job run time and time to result</h3>
  <table class="percentiles">
    <tr><th></th><th class="n">jobs</th><th class="n">p50</th><th class="n">p90</th><th class="n">p99</th></tr>
% for name in ('hour', 'day'):
% for histogram, label in (('job_run', 'run time'), ('time_to_result', 'time to result')):
% p = view['percentiles'][name][histogram]
    <tr><td>{{label}}, last {{name}}</td><td class="n">{{p['jobs']}}</td><td class="n">{{seconds(p['p50'])}}</td><td class="n">{{seconds(p['p90'])}}</td><td class="n">{{seconds(p['p99'])}}</td></tr>
% end
% end
  </table>
  <h3>scaler</h3>
% scaler = view['scaler']
% if scaler:
  <p>circuit breaker: <span class="{{'breaker-open' if scaler['breaker_open'] else ''}}" data-breaker="{{'open' if scaler['breaker_open'] else 'closed'}}">{{'open' if scaler['breaker_open'] else 'closed'}}</span>,
  {{scaler['consecutive_failures']}} failure(s) in a row; last run {{ago(scaler['last_run_s_ago'])}}</p>
% if detailed and scaler.get('last_error'):
  <p class="error">last error ({{ago(scaler['last_failure_s_ago'])}}): {{scaler['last_error']}}</p>
% end
% else:
  <p>no scaler run recorded yet</p>
% end
% if view['runs']:
  <table class="runs">
    <tr><th>run</th><th class="n">needed</th><th class="n">ready</th><th class="n">booting</th><th class="n">launched</th><th class="n">terminated</th><th class="n">failures</th><th>breaker</th></tr>
% for run in view['runs']:
    <tr class="run"><td class="n">{{ago(view_time - run['recorded_at'])}}</td><td class="n">{{run['needed']}}</td><td class="n">{{run['ready']}}</td><td class="n">{{run['booting']}}</td><td class="n">{{run['launched']}}{{' of %d' % run['allowed'] if run['allowed'] != run['launched'] else ''}}</td><td class="n">{{run['terminated']}}</td><td class="n">{{run['launch_failures'] + run['provisioning_failures']}}</td><td>{{run['breaker']}}</td></tr>
    <tr class="reason"><td></td><td colspan="7" class="reason">{{run['reason']}}
% if detailed:
% for error in run['errors']:
      <div class="error">{{error}}</div>
% end
% end
    </td></tr>
% end
  </table>
% end
% cost = view.get('cost')
% if cost and (cost['last_day']['by_type'] or view.get('workers_leaving')):
  <h3>what the workers cost (the whole cluster, estimated)</h3>
  <table class="cost">
    <tr><th>market</th><th>type</th><th class="n">last hour</th><th class="n">USD</th><th class="n">last day</th><th class="n">USD</th></tr>
% hour = {(e['market'], e['instance_type']): e for e in cost['last_hour']['by_type']}
% for entry in cost['last_day']['by_type']:
% key = (entry['market'], entry['instance_type'])
% recent = hour.get(key)
    <tr data-cost="{{entry['market']}}/{{entry['instance_type']}}"><td>{{entry['market']}}</td><td>{{entry['instance_type']}}</td><td class="n">{{seconds(recent['worker_seconds']) if recent else '–'}}</td><td class="n">{{'%.4f' % recent['estimated_usd'] if recent and recent['estimated_usd'] is not None else '–'}}</td><td class="n">{{seconds(entry['worker_seconds'])}}</td><td class="n">{{'%.4f' % entry['estimated_usd'] if entry['estimated_usd'] is not None else '–'}}</td></tr>
% end
    <tr data-cost="total"><td colspan="2">in all</td><td class="n">{{seconds(cost['last_hour']['worker_seconds'])}}</td><td class="n">{{'%.4f' % cost['last_hour']['estimated_usd']}}</td><td class="n">{{seconds(cost['last_day']['worker_seconds'])}}</td><td class="n">{{'%.4f' % cost['last_day']['estimated_usd']}}</td></tr>
  </table>
  <p data-leaving="{{view.get('workers_leaving', 0)}}">workers leaving (Spot interruptions, last hour): {{view.get('workers_leaving', 0)}} · prices: {{cost['prices']}}</p>
% end
% if detailed:
  <h3>failed items ({{counts['failed']}})</h3>
% if view['failed_items']:
  <table class="failed">
    <tr><th>id</th><th class="n">attempts</th><th>last error</th><th>worker</th></tr>
% for item in view['failed_items']:
    <tr><td>{{item['id']}}</td><td class="n">{{item['attempts']}}</td><td class="error">{{item['failed_reason']}}</td><td>{{item['worker_id'] or ''}}</td></tr>
% end
  </table>
% else:
  <p>none</p>
% end
  <h3>workers heard from ({{len(view['workers'])}})</h3>
% if view['workers']:
  <table class="workers">
    <tr><th>worker</th><th class="n">last heard</th><th class="n">jobs completed</th></tr>
% for worker in view['workers']:
    <tr><td>{{worker['id']}}</td><td class="n">{{ago(worker['last_seen_s_ago'])}}</td><td class="n">{{worker['jobs_completed']}}</td></tr>
% end
  </table>
% else:
  <p>none</p>
% end
% end
% end
</section>
% end
</div>
</body>
</html>
