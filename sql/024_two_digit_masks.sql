-- Issue 15: a masked real number keeps its last two digits only (+***67). Call rows written
-- before kept eight of eleven (+7916***4567: 1,000 candidates); they are masked again here.
UPDATE calls SET caller_masked =
        CASE WHEN left(caller_masked, 1) = '+' THEN '+' ELSE '' END || '***'
        || CASE WHEN length(regexp_replace(caller_masked, '[^0-9]', '', 'g')) > 2
                THEN right(regexp_replace(caller_masked, '[^0-9]', '', 'g'), 2) ELSE '' END
    WHERE caller_masked IS NOT NULL AND caller_masked !~ '^\+?\*\*\*[0-9]{0,2}$';
