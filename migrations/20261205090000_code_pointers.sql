-- Pointers from the SQL copy of each rule that deliberately lives twice to its Python copy
-- (ARCHITECTURE.md, "Rules that live in two places"). Applied migrations are never edited, so
-- the pointers are function comments: visible with \df+ and in PostgREST's OpenAPI text.
-- Comments only: no behaviour, grant or signature changes.

comment on function public.messages_validate() is
  'Refuses a bad message at insert/update. Option and prompt rules are repeated in '
  'core/validation.py (the listener''s second line for rows that bypass this trigger): '
  'change both together.';

comment on function image_queue.enqueue_image_request() is
  'Queues an image request and sends NOTIFY on channel image_requests; the listener LISTENs '
  'on the same name (listener/wakeups/listen.py CHANNEL).';

comment on function public.image_jobs_claim(text, integer, double precision, integer) is
  'Leases due jobs to a worker and writes the generating reply. A job already claimed '
  'p_max_attempts times ends here with a failed reply; the listener decides the same limit '
  'for failures it sees (core/retry.py decide_after_failure), and its user-visible texts '
  'live in core/errors.py and core/retry.py.';

comment on function public.image_jobs_fail(uuid, text, integer, text, text, double precision, jsonb) is
  'Records a failed attempt: a retry at run_at, or a failed reply carrying p_error, the '
  'user-safe text the listener chose (core/errors.py public_message, core/retry.py).';

comment on function public.image_jobs_cancel(uuid, text) is
  'An operator stops a request (image-listener cancel); the default reason is user-visible '
  'text, as are the listener''s in core/errors.py.';

comment on function public.image_jobs_release(uuid, text, integer) is
  'Hands a job back without counting the attempt; NOTIFY image_requests (the channel of '
  'listener/wakeups/listen.py CHANNEL).';

comment on function public.image_jobs_retry(uuid) is
  'An operator retries a failed request (image-listener retry); NOTIFY image_requests (the '
  'channel of listener/wakeups/listen.py CHANNEL).';

comment on function public.image_jobs_requeue_stuck() is
  'Requeues jobs with an expired lease (image-listener requeue-stuck); NOTIFY image_requests '
  '(the channel of listener/wakeups/listen.py CHANNEL).';
