-- Rendered by Jinja before the operator sees it: {{ ds }} is the run's logical date.
SELECT *
FROM orders
WHERE day = '{{ ds }}'
  AND id % {{ params.modulo }} = 0  -- a trailing comment must not break the COPY
